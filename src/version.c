#include "config.h"
#include "cmoe.h"

const char *moe_version(void) { return PACKAGE_VERSION; }

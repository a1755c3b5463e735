/* Which variant of the kernels this build is (simd.h): the loader logs it and tests select by it. */
#include "simd.h"

const char *taxiway_kernel_variant(void) { return TAXIWAY_VARIANT; }

// Emulator stand-in: the CUDA runtime declarations the emulator provides.
#pragma once

#include "cuda_emulation.h"

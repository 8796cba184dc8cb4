/* Floors (floors.c): the copy and broadcast bandwidths measured in the same run as the
 * updates they are compared with (CKPT__CMD_FLOORS). */
#ifndef CKPT_ENGINE_FLOORS_H
#define CKPT_ENGINE_FLOORS_H

#include "engine/engine_internal.h"

int ckpt__floors_run(ckpt_engine_t *e, ckpt_floors_t *floors);

#endif

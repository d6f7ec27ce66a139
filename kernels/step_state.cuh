// The two small device buffers one optimiser step reads and writes besides the tensors
// (src/cuda/step.rs mirrors these indices). Keeping them on the device lets a whole step
// run, or replay as a CUDA graph, without the host reading anything in between.
#pragma once

// hyper [HYPER_LEN] f32, written by the host before each step: the AdamW constants of the
// step (computed on the host exactly as optim::adamw_update computes them) and the clip.
#define HYPER_MICRO_BATCHES 0    // micro-batches whose mean losses the loss sum adds up
#define HYPER_CLIP 1             // largest gradient norm kept; +inf: no clipping
#define HYPER_BETA1 2
#define HYPER_ONE_MINUS_BETA1 3
#define HYPER_BETA2 4
#define HYPER_ONE_MINUS_BETA2 5
#define HYPER_EPS 6
#define HYPER_DECAY_KEEP 7       // 1 - lr * weight_decay
#define HYPER_STEP_SIZE 8        // lr / (1 - beta1^t)
#define HYPER_INV_SQRT_BC2 9     // 1 / sqrt(1 - beta2^t)
#define HYPER_LEN 10

// state [STATE_LEN] f32, written by step_finish (kernels/reduce.cu), read by AdamW and,
// a step later, by the host.
#define STATE_LOSS 0        // the step's mean loss
#define STATE_NORM 1        // the global gradient norm
#define STATE_DIVERGED 2    // 1 once a step's loss or norm was not finite; never lowered
#define STATE_CLIP_SCALE 3  // what AdamW multiplies every gradient by
#define STATE_LEN 4

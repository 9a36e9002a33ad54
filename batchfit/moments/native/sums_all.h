/* Every instantiation of sums.h: degree D = 0..10, float or double inputs, weights or not.
 * (Written out: the C preprocessor cannot loop.) */
#define T float
#define TN f32
#define IS_DOUBLE 0
#define W 0
#define D 0
#include "sums.h"
#undef D
#define D 1
#include "sums.h"
#undef D
#define D 2
#include "sums.h"
#undef D
#define D 3
#include "sums.h"
#undef D
#define D 4
#include "sums.h"
#undef D
#define D 5
#include "sums.h"
#undef D
#define D 6
#include "sums.h"
#undef D
#define D 7
#include "sums.h"
#undef D
#define D 8
#include "sums.h"
#undef D
#define D 9
#include "sums.h"
#undef D
#define D 10
#include "sums.h"
#undef D
#undef W
#define W 1
#define D 0
#include "sums.h"
#undef D
#define D 1
#include "sums.h"
#undef D
#define D 2
#include "sums.h"
#undef D
#define D 3
#include "sums.h"
#undef D
#define D 4
#include "sums.h"
#undef D
#define D 5
#include "sums.h"
#undef D
#define D 6
#include "sums.h"
#undef D
#define D 7
#include "sums.h"
#undef D
#define D 8
#include "sums.h"
#undef D
#define D 9
#include "sums.h"
#undef D
#define D 10
#include "sums.h"
#undef D
#undef W
#undef T
#undef TN
#undef IS_DOUBLE

#define T double
#define TN f64
#define IS_DOUBLE 1
#define W 0
#define D 0
#include "sums.h"
#undef D
#define D 1
#include "sums.h"
#undef D
#define D 2
#include "sums.h"
#undef D
#define D 3
#include "sums.h"
#undef D
#define D 4
#include "sums.h"
#undef D
#define D 5
#include "sums.h"
#undef D
#define D 6
#include "sums.h"
#undef D
#define D 7
#include "sums.h"
#undef D
#define D 8
#include "sums.h"
#undef D
#define D 9
#include "sums.h"
#undef D
#define D 10
#include "sums.h"
#undef D
#undef W
#define W 1
#define D 0
#include "sums.h"
#undef D
#define D 1
#include "sums.h"
#undef D
#define D 2
#include "sums.h"
#undef D
#define D 3
#include "sums.h"
#undef D
#define D 4
#include "sums.h"
#undef D
#define D 5
#include "sums.h"
#undef D
#define D 6
#include "sums.h"
#undef D
#define D 7
#include "sums.h"
#undef D
#define D 8
#include "sums.h"
#undef D
#define D 9
#include "sums.h"
#undef D
#define D 10
#include "sums.h"
#undef D
#undef W
#undef T
#undef TN
#undef IS_DOUBLE

static const run_f32_fn RUN_f32_W0[MAX_DEGREE + 1] = {run_0_f32_w0, run_1_f32_w0, run_2_f32_w0, run_3_f32_w0, run_4_f32_w0, run_5_f32_w0, run_6_f32_w0, run_7_f32_w0, run_8_f32_w0, run_9_f32_w0, run_10_f32_w0};
static const run_f32_fn RUN_f32_W1[MAX_DEGREE + 1] = {run_0_f32_w1, run_1_f32_w1, run_2_f32_w1, run_3_f32_w1, run_4_f32_w1, run_5_f32_w1, run_6_f32_w1, run_7_f32_w1, run_8_f32_w1, run_9_f32_w1, run_10_f32_w1};
static const run_f64_fn RUN_f64_W0[MAX_DEGREE + 1] = {run_0_f64_w0, run_1_f64_w0, run_2_f64_w0, run_3_f64_w0, run_4_f64_w0, run_5_f64_w0, run_6_f64_w0, run_7_f64_w0, run_8_f64_w0, run_9_f64_w0, run_10_f64_w0};
static const run_f64_fn RUN_f64_W1[MAX_DEGREE + 1] = {run_0_f64_w1, run_1_f64_w1, run_2_f64_w1, run_3_f64_w1, run_4_f64_w1, run_5_f64_w1, run_6_f64_w1, run_7_f64_w1, run_8_f64_w1, run_9_f64_w1, run_10_f64_w1};
static const points_fn POINTS_W0[MAX_DEGREE + 1] = {points_0_w0, points_1_w0, points_2_w0, points_3_w0, points_4_w0, points_5_w0, points_6_w0, points_7_w0, points_8_w0, points_9_w0, points_10_w0};
static const points_fn POINTS_W1[MAX_DEGREE + 1] = {points_0_w1, points_1_w1, points_2_w1, points_3_w1, points_4_w1, points_5_w1, points_6_w1, points_7_w1, points_8_w1, points_9_w1, points_10_w1};

/* batchfit's aggregation kernel: per-series sufficient statistics of a polynomial MSE fit,
 * accumulated in one pass over points that arrive in any order.
 *
 * Built with the package (setup.py: the extension batchfit.moments.native._aggregate) and
 * called through ctypes, which releases the GIL: the caller decodes the next Parquet batch in
 * other threads while this runs. On x86-64 it is built twice, for the baseline and for
 * AVX-512 (x86-64-v4: 4x faster on grouped points), and the loader takes the AVX-512 build
 * where bf_cpu_ok says the CPU runs it.
 *
 * A series' statistics live in one row of a float64 table that the caller owns:
 *   CENTRE, HALF, INVH   its frame: t = (x - CENTRE) / HALF; every accumulated point has
 *                        |t| <= 1 (HALF = 0: all of them sit at CENTRE, and t = 0)
 *   YREF                 a fixed shift of y (the series' first used y), so that sums of y
 *                        stay small next to their spread
 *   LO, HI, NPTS         range of x and count of the used points
 *   YSCALE, WSCALE       powers of two that bring the series' first |y| and w near 1 when
 *                        they are far from it (else 1): squares of y ~ 1e200 or products
 *                        of weights ~ 1e-200 would leave float64's range
 *   with u = (y - YREF) YSCALE and v = w WSCALE:
 *   S[m] = sum v T_m(t)       m = 0 .. 2D     (T_m: Chebyshev polynomials)
 *   R[j] = sum v u T_j(t)     j = 0 .. D
 *   Y2   = sum v u^2
 *   and, in weighted tables, the same three again with w = 1 (the unweighted rmse needs them).
 * The frame always contains the accumulated points, so every T_m(t) lies in [-1, 1] and the
 * sums keep float64's digits for any offset of x (timestamps). Before points outside the
 * frame are added, the sums are mapped exactly onto a wider frame (reframe): T_m(a t + b) is a
 * combination of T_0 .. T_m whose coefficients lie in [-2, 2] when the old interval lies inside
 * the new one. At the end every series is mapped onto its exact frame [LO, HI].
 *
 * Points come in batches of (code, x, y, w), code being the series' row. Runs of one code
 * (grouped input) are summed in place, LANES points at a time. Shorter runs (scattered input)
 * are buffered per block of BUCKET_ROWS rows and summed when the buffer fills, so that their
 * writes land in a block of the table that stays in cache.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "shared.h" /* the numbers Python shares: row header, thresholds, statuses, errors */

#define MAX_M (2 * MAX_DEGREE + 1)
#define LANES 8
#define RUN_MIN 8
#define BUCKET_SHIFT 14
#define BUCKET_ROWS (1 << BUCKET_SHIFT)
#define BUCKET_MAX_POINTS 262144
#define BUCKET_MIN_POINTS 1024
#define BUCKET_BUDGET (256L << 20) /* bytes of buffered points, all buckets together */

/* a buffered point: x, y, w and the row's offset inside its bucket */
typedef struct { float x, y, w; uint32_t r; } pt_f32;
typedef struct { double x, y, w; uint32_t r, pad; } pt_f64;

typedef struct {
  int degree, weighted, dbl;
  int64_t width;
  double slack;
  double *table;
  uint8_t *seen;
  int64_t rows;
  int64_t nbuckets, bucket_points, entry, stride;
  char **bucket, *region; /* the buckets' buffers, carved from one region of huge pages */
  size_t region_bytes;
  int32_t *fill;
  char *scratch;
  int32_t *count;
  double *xs, *ys, *ws;
  int64_t last, nruns, runcap;
  int64_t *runlist;
} agg;

static inline int nm_of(int degree) { return 2 * degree + 1; }
static inline int block_of(int degree) { return nm_of(degree) + degree + 2; }

/* What the loader checks against batchfit.moments.shared before it uses this kernel. */
int64_t bf_shared(void) { return BF_SHARED; }

/* Whether this CPU runs this build's instructions (itself baseline code, so that any x86-64
 * CPU can ask). (GCC's target_clones would keep one file, but it compiles the vector
 * extensions' compares of the cloned functions element by element: 3x slower.) */
#if defined(__x86_64__) && defined(__AVX512F__)
__attribute__((target("arch=x86-64"))) int64_t bf_cpu_ok(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4");
}
#else
int64_t bf_cpu_ok(void) { return 1; }
#endif

int64_t bf_width(int degree, int weighted) {
  return HEADER + (int64_t)block_of(degree) * (weighted ? 2 : 1);
}

/* used: x, y and w finite, w > 0 (branch-free, so that loops vectorise; NaN fails each test) */
static inline int valid(double x, double y, double w) {
  return (fabs(x) <= DBL_MAX) & (fabs(y) <= DBL_MAX) & (w <= DBL_MAX) & (w > 0);
}

/* ---------------------------------------------------------------- frames */

/* M[m][j]: T_m(a t + b) = sum_j M[m][j] T_j(t), for m, j < nm. */
static void cheb_map(double a, double b, int nm, double *M) {
  memset(M, 0, sizeof(double) * nm * nm);
  M[0] = 1;
  if (nm == 1) return;
  M[nm] = b;
  M[nm + 1] = a;
  for (int m = 1; m + 1 < nm; m++) {
    const double *P = M + m * nm, *Q = M + (m - 1) * nm;
    double *N = M + (m + 1) * nm, tp[MAX_M + 1];
    memset(tp, 0, sizeof tp);
    tp[1] = P[0]; /* t T_0 = T_1; t T_i = (T_{i+1} + T_{i-1}) / 2 */
    for (int i = 1; i <= m; i++) {
      tp[i + 1] += 0.5 * P[i];
      tp[i - 1] += 0.5 * P[i];
    }
    for (int j = 0; j <= m + 1; j++) N[j] = 2 * (a * tp[j] + b * P[j]) - Q[j];
  }
}

static void map_block(const double *M, int nm, int k, double *S) {
  double tmp[MAX_M], *R = S + nm;
  for (int m = 0; m < nm; m++) {
    double s = 0;
    for (int j = 0; j <= m; j++) s += M[m * nm + j] * S[j];
    tmp[m] = s;
  }
  memcpy(S, tmp, sizeof(double) * nm);
  for (int m = 0; m < k; m++) {
    double s = 0;
    for (int j = 0; j <= m; j++) s += M[m * nm + j] * R[j];
    tmp[m] = s;
  }
  memcpy(R, tmp, sizeof(double) * k);
}

static void set_frame(double *row, double centre, double half) {
  row[CENTRE] = centre;
  row[HALF] = half;
  row[INVH] = half > 0 ? 1 / half : 0;
}

/* Map a row's sums onto the frame (centre, half), which must contain its points. */
static void reframe(double *row, int degree, int weighted, double centre, double half) {
  int nm = nm_of(degree), k = degree + 1;
  double a = half > 0 ? row[HALF] / half : 0, b = half > 0 ? (row[CENTRE] - centre) / half : 0;
  double M[MAX_M * MAX_M];
  cheb_map(a, b, nm, M);
  map_block(M, nm, k, row + HEADER);
  if (weighted) map_block(M, nm, k, row + HEADER + block_of(degree));
  set_frame(row, centre, half);
}

/* 1, or for a magnitude far from 1 the power of two that brings it near 1 (at most 2^1000:
 * a subnormal's reciprocal power is beyond float64). */
static double scale_for(double magnitude) {
  if (!(magnitude > 0x1p-100 && magnitude < 0x1p100) && magnitude > 0 && magnitude <= DBL_MAX) {
    int e;
    frexp(magnitude, &e);
    return ldexp(1, -e < 1000 ? -e : 1000);
  }
  return 1;
}

/* Make room in the row's frame for used points spanning [lo, hi] (the first points: also
 * the y reference and the scales, from their largest |y| and w). */
static void widen(agg *a, double *row, double lo, double hi, double first_y, double ymax,
                  double wmax) {
  if (row[NPTS] == 0) { /* the first points: their own exact frame */
    row[LO] = lo;
    row[HI] = hi;
    row[YREF] = first_y;
    row[YSCALE] = scale_for(ymax);
    row[WSCALE] = scale_for(wmax);
    set_frame(row, 0.5 * (lo + hi), 0.5 * (hi - lo));
    return;
  }
  if (lo < row[LO]) row[LO] = lo;
  if (hi > row[HI]) row[HI] = hi;
  if (row[LO] < row[CENTRE] - row[HALF] || row[HI] > row[CENTRE] + row[HALF]) {
    /* slack > 1 leaves room for more growth (fewer reframes of scattered series) */
    double centre = 0.5 * (row[LO] + row[HI]), half = 0.5 * (row[HI] - row[LO]) * a->slack;
    if (centre - half > row[LO] || centre + half < row[HI]) /* (whatever rounding did) */
      half = fmax(centre - row[LO], row[HI] - centre);
    reframe(row, a->degree, a->weighted, centre, half);
  }
}

/* ---------------------------------------------------------------- sums */

/* LANES-wide vectors (GCC/Clang vector extensions: AVX-512, AVX2 or NEON, whatever is there) */
typedef double vd __attribute__((vector_size(LANES * 8)));
typedef int64_t vi __attribute__((vector_size(LANES * 8)));
typedef float vf __attribute__((vector_size(LANES * 4)));
#define VD(v) ((vd){0} + (double)(v))
#define VI(v) ((vi){0} + (int64_t)(v))
static inline vd load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, vd); }
static inline vd load_f64(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }
/* finite: the exponent bits are not all ones (they are for NaN and inf) */
static inline vi finite_v(vd v) { return ((vi)v & 0x7fffffffffffffffLL) < 0x7ff0000000000000LL; }
static inline vi usable(vd x, vd y, vd w) { return finite_v(x) & finite_v(y) & finite_v(w) & (w > 0); }
static inline vd keep(vd v, vi m) { return (vd)((vi)v & m); }
static inline vd blend(vi m, vd a, vd b) { return (vd)(((vi)a & m) | ((vi)b & ~m)); }

#define CAT(a, b) a##b
#define XCAT(a, b) CAT(a, b)
typedef void (*run_f32_fn)(agg *, double *, int64_t, const float *, const float *, const float *);
typedef void (*run_f64_fn)(agg *, double *, int64_t, const double *, const double *, const double *);
typedef void (*points_fn)(agg *, double *, int64_t, const double *, const double *, const double *);

#include "sums_all.h"

/* ---------------------------------------------------------------- runs and buffers */

/* A new run of ``code`` begins (unless the previous batch's last run goes on). The input is
 * grouped when every series is one run; the runs, in order, are then the series' order. */
static int note_run(agg *a, int64_t code) {
  if (code == a->last) return 0;
  a->last = code;
  a->nruns++;
  if (!a->runlist && a->nruns > 1) return 0; /* scattered already: no list kept */
  if (a->nruns > a->rows) { /* more runs than series: scattered */
    free(a->runlist);
    a->runlist = NULL;
    a->runcap = 0;
    return 0;
  }
  if (a->nruns > a->runcap) {
    int64_t cap = a->runcap ? 2 * a->runcap : 1 << 16;
    int64_t *list = realloc(a->runlist, sizeof(int64_t) * cap);
    if (!list) return BF_NO_MEMORY;
    a->runlist = list;
    a->runcap = cap;
  }
  a->runlist[a->nruns - 1] = code;
  return 0;
}

#define DEFINE_BATCH(T, TN, PT)                                                             \
  static void flush_##TN(agg *a, int64_t b) {                                              \
    int32_t m = a->fill[b];                                                                \
    if (!m) return;                                                                        \
    const PT *in = (const PT *)a->bucket[b];                                               \
    PT *out = (PT *)a->scratch;                                                            \
    int32_t *count = a->count;                                                             \
    memset(count, 0, sizeof(int32_t) * (BUCKET_ROWS + 1));                                 \
    for (int32_t i = 0; i < m; i++) count[in[i].r + 1]++;                                  \
    for (int32_t r = 0; r < BUCKET_ROWS; r++) count[r + 1] += count[r];                    \
    for (int32_t i = 0; i < m; i++) out[count[in[i].r]++] = in[i];                         \
    points_fn sum = (a->weighted ? POINTS_W1 : POINTS_W0)[a->degree];                      \
    int64_t base = b << BUCKET_SHIFT;                                                      \
    int32_t i = 0;                                                                         \
    while (i < m) {                                                                        \
      int32_t j = i;                                                                       \
      for (; j < m && out[j].r == out[i].r; j++) {                                         \
        a->xs[j - i] = out[j].x;                                                           \
        a->ys[j - i] = out[j].y;                                                           \
        a->ws[j - i] = out[j].w;                                                           \
      }                                                                                    \
      int64_t row = base + out[i].r;                                                       \
      a->seen[row] = 1;                                                                    \
      sum(a, a->table + row * a->width, j - i, a->xs, a->ys, a->ws);                       \
      i = j;                                                                               \
    }                                                                                      \
    a->fill[b] = 0;                                                                        \
  }                                                                                        \
                                                                                           \
  int bf_add_##TN(agg *a, int64_t n, const int64_t *codes, int64_t offset, const T *x,     \
                  const T *y, const T *w, int note) {                                      \
    if (!w != !a->weighted || a->dbl != (sizeof(T) == 8)) return BF_MISMATCH;                       \
    run_##TN##_fn run = (w ? RUN_##TN##_W1 : RUN_##TN##_W0)[a->degree];                    \
    int64_t i = 0;                                                                         \
    while (i < n) {                                                                        \
      int64_t raw = codes[i], code = raw - offset, j = i + 1;                              \
      if (code < 0 || code >= a->rows) return BF_BAD_CODE;                                          \
      while (j < n && codes[j] == raw) j++;                                                \
      if (note && note_run(a, code)) return BF_NO_MEMORY;                                            \
      if (j - i >= RUN_MIN) {                                                              \
        a->seen[code] = 1;                                                                 \
        run(a, a->table + code * a->width, j - i, x + i, y + i, w ? w + i : NULL);         \
      } else {                                                                             \
        int64_t b = code >> BUCKET_SHIFT;                                                  \
        if (!a->bucket[b]) a->bucket[b] = a->region + b * a->stride;                        \
        PT *buffer = (PT *)a->bucket[b];                                                   \
        for (int64_t p = i; p < j; p++) {                                                  \
          PT *e = buffer + a->fill[b];                                                     \
          e->x = x[p];                                                                     \
          e->y = y[p];                                                                     \
          e->w = w ? w[p] : 1;                                                             \
          e->r = (uint32_t)(code & (BUCKET_ROWS - 1));                                     \
          if (++a->fill[b] == a->bucket_points) flush_##TN(a, b);                          \
        }                                                                                  \
      }                                                                                    \
      i = j;                                                                               \
    }                                                                                      \
    return 0;                                                                              \
  }
DEFINE_BATCH(float, f32, pt_f32)
DEFINE_BATCH(double, f64, pt_f64)

/* Dense rows (the Python API's (B, N) arrays): row r of y is series ``first + r``; x is
 * shared (x_stride 0) or one row per series (x_stride n); w is NULL or like y. */
#define DEFINE_DENSE(T, TN)                                                                 \
  int bf_add_dense_##TN(agg *a, int64_t first, int64_t rows, int64_t n, const T *x,       \
                        int64_t x_stride, const T *y, const T *w) {                        \
    if (!w != !a->weighted || a->dbl != (sizeof(T) == 8)) return BF_MISMATCH;                       \
    if (first < 0 || first + rows > a->rows) return BF_BAD_CODE;                                    \
    run_##TN##_fn run = (w ? RUN_##TN##_W1 : RUN_##TN##_W0)[a->degree];                    \
    for (int64_t r = 0; r < rows; r++) {                                                   \
      int64_t code = first + r;                                                            \
      a->seen[code] = 1;                                                                   \
      run(a, a->table + code * a->width, n, x + r * x_stride, y + r * n, w ? w + r * n : NULL); \
    }                                                                                      \
    return 0;                                                                              \
  }
DEFINE_DENSE(float, f32)
DEFINE_DENSE(double, f64)

/* Series seen in this order, one run each, whether they have points or not (list format:
 * a row is a series; its points are then added with note = 0). */
int bf_note(agg *a, int64_t n, const int64_t *codes, int64_t offset) {
  for (int64_t i = 0; i < n; i++) {
    int64_t code = codes[i] - offset;
    if (code < 0 || code >= a->rows) return BF_BAD_CODE;
    if (note_run(a, code)) return BF_NO_MEMORY;
    a->seen[code] = 1;
  }
  return 0;
}

void bf_flush(agg *a) {
  for (int64_t b = 0; b < a->nbuckets; b++) {
    if (!a->bucket[b]) continue;
    if (a->dbl) flush_f64(a, b); else flush_f32(a, b);
  }
}

/* ---------------------------------------------------------------- the front door */

void bf_free(agg *a) {
  if (!a) return;
  if (a->region) munmap(a->region, a->region_bytes);
  free(a->bucket);
  free(a->fill);
  free(a->scratch);
  free(a->count);
  free(a->runlist);
  free(a->xs);
  free(a->ys);
  free(a->ws);
  free(a);
}

/* An aggregator for one degree, weighted or not, float64 (dbl) or float32 inputs. Widened
 * frames are SLACK times wider than the points up to SLACK_MAX_DEGREE, else exactly as wide. */
agg *bf_new(int degree, int weighted, int dbl) {
  if (degree < 0 || degree > MAX_DEGREE) return NULL;
  agg *a = calloc(1, sizeof(agg));
  if (!a) return NULL;
  a->degree = degree;
  a->weighted = weighted;
  a->dbl = dbl;
  a->width = bf_width(degree, weighted);
  a->slack = degree <= SLACK_MAX_DEGREE ? SLACK : 1.0;
  a->last = -1;
  a->entry = dbl ? sizeof(pt_f64) : sizeof(pt_f32);
  a->bucket_points = BUCKET_MAX_POINTS;
  a->scratch = malloc(sizeof(pt_f64) * BUCKET_MAX_POINTS);
  a->count = malloc(sizeof(int32_t) * (BUCKET_ROWS + 1));
  a->xs = malloc(sizeof(double) * BUCKET_MAX_POINTS);
  a->ys = malloc(sizeof(double) * BUCKET_MAX_POINTS);
  a->ws = malloc(sizeof(double) * BUCKET_MAX_POINTS);
  if (!a->scratch || !a->count || !a->xs || !a->ys || !a->ws) {
    bf_free(a);
    return NULL;
  }
  return a;
}

/* Point the aggregator at a (new, larger) table and its ``seen`` bytes; buffered points are
 * summed into the old table first (the caller copies it into the new one afterwards). */
int bf_set_table(agg *a, double *table, uint8_t *seen, int64_t rows) {
  int64_t nb = (rows >> BUCKET_SHIFT) + 1;
  if (nb > a->nbuckets) {
    /* the new buffers first: refused (out of memory), the aggregator is left as it was */
    int64_t points = BUCKET_BUDGET / (nb * a->entry);
    points = points > BUCKET_MAX_POINTS ? BUCKET_MAX_POINTS
             : points < BUCKET_MIN_POINTS ? BUCKET_MIN_POINTS : points;
    /* (buffers a power of two apart would all fall into the same cache sets: stagger them) */
    int64_t stride = a->entry * points + 4160;
    size_t bytes = (size_t)(nb * stride);
    char **bucket = calloc(nb, sizeof(char *));
    int32_t *fill = calloc(nb, sizeof(int32_t));
    /* reserved, not committed: only the buckets that scattered points reach are touched */
    char *region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!bucket || !fill || region == MAP_FAILED) {
      free(bucket);
      free(fill);
      if (region != MAP_FAILED) munmap(region, bytes);
      return BF_NO_MEMORY;
    }
#ifdef MADV_HUGEPAGE
    /* huge pages keep the writes to a few hundred buffers from missing the TLB each time */
    madvise(region, bytes, MADV_HUGEPAGE);
#endif
    bf_flush(a); /* buffered points go into the old table (the caller copies it over) */
    if (a->region) munmap(a->region, a->region_bytes);
    free(a->bucket);
    free(a->fill);
    a->bucket = bucket;
    a->fill = fill;
    a->region = region;
    a->region_bytes = bytes;
    a->nbuckets = nb;
    a->bucket_points = points;
    a->stride = stride;
  }
  a->table = table;
  a->seen = seen;
  a->rows = rows;
  return 0;
}

/* Sum everything buffered and map every series onto its exact frame [LO, HI]. */
void bf_finish(agg *a, int64_t rows) {
  bf_flush(a);
  for (int64_t r = 0; r < rows; r++) {
    double *row = a->table + r * a->width;
    if (row[NPTS] == 0) continue;
    double centre = 0.5 * (row[LO] + row[HI]), half = 0.5 * (row[HI] - row[LO]);
    if (centre != row[CENTRE] || half != row[HALF]) reframe(row, a->degree, a->weighted, centre, half);
  }
}


/* The number of runs so far; with out, the runs' codes in order (when every series was one
 * run: the input was grouped). -1: more runs than rows, so scattered. */
int64_t bf_runs(agg *a, int64_t *out) {
  if (!a->runlist && a->nruns > 1) return -1;
  if (out && a->nruns) memcpy(out, a->runlist, sizeof(int64_t) * a->nruns);
  return a->nruns;
}


/* ---------------------------------------------------------------- the fit of each series */


/* Lower Cholesky factor of the k x k matrix A (row-major) in L, with the reciprocals of its
 * diagonal on L's diagonal (the solves multiply); returns 1 when every pivot is above rel_tol
 * times its diagonal entry (else the pivot is replaced by 1 and it returns 0); *smallest:
 * the smallest relative pivot. */
static inline __attribute__((always_inline)) int cholesky(const double *A, int k, double rel_tol, double *L, double *smallest) {
  int ok = 1;
  double least = INFINITY;
  memset(L, 0, sizeof(double) * k * k);
  for (int j = 0; j < k; j++) {
    double pivot = A[j * k + j];
    for (int m = 0; m < j; m++) pivot -= L[j * k + m] * L[j * k + m];
    int good = pivot > rel_tol * fabs(A[j * k + j]);
    double relative = pivot / fabs(A[j * k + j]);
    least = relative < least ? relative : least;
    ok &= good;
    double inv = 1 / sqrt(good ? pivot : 1);
    L[j * k + j] = inv;
    for (int i = j + 1; i < k; i++) {
      double v = A[i * k + j];
      for (int m = 0; m < j; m++) v -= L[i * k + m] * L[j * k + m];
      L[i * k + j] = v * inv;
    }
  }
  *smallest = least;
  return ok;
}

/* x = A^-1 b from cholesky's L. */
static inline __attribute__((always_inline)) void chol_solve(const double *L, int k, const double *b, double *x) {
  double z[MAX_DEGREE + 1];
  for (int i = 0; i < k; i++) {
    double v = b[i];
    for (int m = 0; m < i; m++) v -= L[i * k + m] * z[m];
    z[i] = v * L[i * k + i];
  }
  for (int i = k - 1; i >= 0; i--) {
    double v = z[i];
    for (int m = i + 1; m < k; m++) v -= L[m * k + i] * x[m];
    x[i] = v * L[i * k + i];
  }
}

static inline __attribute__((always_inline)) double dot(const double *a, const double *b, int k) {
  double s = 0;
  for (int i = 0; i < k; i++) s += a[i] * b[i];
  return s;
}

static inline __attribute__((always_inline)) double quad(const double *G, const double *v, int k) {
  double s = 0;
  for (int i = 0; i < k; i++) s += v[i] * dot(G + i * k, v, k);
  return s;
}

static inline __attribute__((always_inline)) void gram(const double *S, int k, double *G) {
  for (int i = 0; i < k; i++)
    for (int j = 0; j < k; j++) G[i * k + j] = 0.5 * (S[i + j] + S[abs(i - j)]);
}

/* C2M (k x k): column j holds the monomial coefficients of T_j (small integers). */
static void cheb_to_mono(int k, double *C2M) {
  memset(C2M, 0, sizeof(double) * k * k);
  C2M[0] = 1;
  if (k > 1) C2M[1 * k + 1] = 1;
  for (int j = 2; j < k; j++)
    for (int i = 0; i < k; i++)
      C2M[i * k + j] = (i ? 2 * C2M[(i - 1) * k + j - 1] : 0) - C2M[i * k + j - 2];
}

/* M (k x k): raw coefficients p = M q of the polynomial sum_j q_j T_j((x - c) / h), p_i
 * multiplying x^i: T_j in powers of t (C2M), then t^j = ((x - c) / h)^j in powers of x. */
static inline __attribute__((always_inline)) void to_raw(double c, double h, int k, const double *C2M, const double *binom,
                   double *M) {
  double shift[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)], negc[MAX_DEGREE + 1], invh[MAX_DEGREE + 1];
  negc[0] = invh[0] = 1;
  for (int j = 1; j < k; j++) {
    negc[j] = negc[j - 1] * -c;
    invh[j] = invh[j - 1] / h;
  }
  for (int i = 0; i < k; i++) /* shift[i][j] = C(j, i) (-c)^(j-i) / h^j */
    for (int j = 0; j < k; j++)
      shift[i * k + j] = j < i ? 0 : binom[j * k + i] * negc[j - i] * invh[j];
  for (int i = 0; i < k; i++)
    for (int j = 0; j < k; j++) {
      double v = 0;
      for (int m = i; m < k; m++) v += shift[i * k + m] * C2M[m * k + j];
      M[i * k + j] = v;
    }
}

/* Fit every row of a statistics table (n rows): MSE in the frame, float64. step: NULL, or a
 * refinement step's moments per row (q0[k], c[k], rss, cu[k], rssu) laid out as 3k+2 values.
 * Outputs per row: params[k] and stderr[k] (raw units), loss, rmse, r2, count, status,
 * trusted (the sums kept their digits), q[k] (Chebyshev coefficients of y - YREF). */
static inline __attribute__((always_inline)) void solve_rows(
    int degree, int weighted, const double *table, int64_t n, const double *step,
    double *params, double *stderr_, double *loss, double *rmse, double *r2, int64_t *count,
    int8_t *status, uint8_t *trusted, double *qout) {
  int64_t width = bf_width(degree, weighted);
  int k = degree + 1, nm = nm_of(degree), blk = block_of(degree);
  double eps = DBL_EPSILON, pivot_tol = 100 * k * eps;
  double C2M[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)], binom[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)];
  cheb_to_mono(k, C2M);
  for (int j = 0; j < k; j++) /* binom[j][i] = C(j, i) */
    for (int i = 0; i < k; i++) binom[j * k + i] = i > j ? 0 : i == 0 || i == j ? 1
                                                   : binom[(j - 1) * k + i - 1] + binom[(j - 1) * k + i];
  for (int64_t r = 0; r < n; r++) {
    const double *row = table + r * width, *S = row + HEADER, *R = S + nm;
    double y2 = S[nm + k], points = row[NPTS];
    double G[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)], L[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)];
    double Gu[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)], q[MAX_DEGREE + 1];
    gram(S, k, G);
    double least;
    int solvable = cholesky(G, k, pivot_tol, L, &least);
    chol_solve(L, k, R, q);
    double sse = y2 - dot(q, R, k), sse_u = sse, y2u = y2;
    const double *U = S + blk, *RU = U + nm;
    if (weighted) {
      gram(U, k, Gu);
      y2u = U[nm + k];
    }
    int trust;
    if (step) {
      const double *q0 = step + r * (3 * k + 2), *c = q0 + k, *cu = c + k + 1;
      double rss = c[k], rssu = cu[k], delta[MAX_DEGREE + 1];
      chol_solve(L, k, c, delta);
      for (int j = 0; j < k; j++) q[j] = q0[j] + delta[j];
      sse = rss - dot(c, delta, k);
      sse_u = weighted ? rssu - 2 * dot(delta, cu, k) + quad(Gu, delta, k) : sse;
      trust = 1;
    } else {
      if (weighted) sse_u = y2u - 2 * dot(q, RU, k) + quad(Gu, q, k);
      int well = least > TRUST_PIVOT;
      double tol = CANCELLATION_MARGIN * eps;
      int kept = sse >= tol * y2 && sse_u >= tol * y2u;
      trust = well && (points <= k || kept) && isfinite(sse);
    }
    if (points <= k) sse = sse_u = 0; /* as many points as coefficients: it interpolates */
    sse = sse > 0 ? sse : 0;
    sse_u = sse_u > 0 ? sse_u : 0;
    /* (the sums are in the row's scales: u = (y - YREF) YSCALE, v = w WSCALE; the fit's
     * numbers are unscaled below, r2 and the trust tests do not depend on them) */
    double wsum = S[0], sst = y2 - R[0] * (R[0] / wsum);
    int ye = ilogb(row[YSCALE]); /* YSCALE = 2^ye */
    double qf[MAX_DEGREE + 1], M[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)];
    for (int j = 0; j < k; j++) qf[j] = ldexp(q[j], -ye);
    qf[0] += row[YREF];
    to_raw(row[CENTRE], row[HALF], k, C2M, binom, M);
    double *p = params + r * k, *se = stderr_ + r * k;
    for (int i = 0; i < k; i++) p[i] = dot(M + i * k, qf, k);
    /* standard errors: cov = s^2 M G^-1 M^T, s^2 = sse / (n - k) */
    double dof = points - k, sigma2 = sse / (dof > 1 ? dof : 1), inv[(MAX_DEGREE + 1) * (MAX_DEGREE + 1)];
    for (int j = 0; j < k; j++) {
      double e[MAX_DEGREE + 1] = {0}, col[MAX_DEGREE + 1];
      e[j] = 1;
      chol_solve(L, k, e, col);
      for (int i = 0; i < k; i++) inv[i * k + j] = col[i];
    }
    for (int i = 0; i < k; i++) {
      /* M's row divided by its largest entry first: for x ~ 1e100 or 1e-80 the entries'
       * squares would leave float64's range */
      double big = 0, Mi[MAX_DEGREE + 1], v = 0;
      for (int a = 0; a < k; a++) big = fmax(big, fabs(M[i * k + a]));
      int be = big > 0 && isfinite(big) ? ilogb(big) : 0;
      for (int a = 0; a < k; a++) Mi[a] = ldexp(M[i * k + a], -be);
      for (int a = 0; a < k; a++) v += Mi[a] * dot(inv + a * k, Mi, k);
      se[i] = solvable && dof > 0 ? ldexp(sqrt(fmax(v * sigma2, 0)), be - ye) : NAN;
    }
    double scaled_loss = sse / wsum;
    loss[r] = ldexp(scaled_loss, -2 * ye); /* (inf when beyond float64: |y| above ~1e154) */
    rmse[r] = ldexp(sqrt(sse_u / points), -ye);
    r2[r] = sst > 0 ? 1 - sse / sst : NAN;
    int finite = isfinite(scaled_loss);
    for (int i = 0; i < k; i++) finite &= isfinite(p[i]);
    int code = finite ? OK : DIVERGED;
    if (!solvable) code = SINGULAR;
    if (points < k) code = TOO_FEW_POINTS;
    if (points < k || !solvable) { /* not identified: no numbers */
      for (int i = 0; i < k; i++) p[i] = se[i] = NAN;
      loss[r] = rmse[r] = r2[r] = NAN;
    }
    count[r] = (int64_t)points;
    status[r] = (int8_t)code;
    trusted[r] = (uint8_t)trust;
    memcpy(qout + r * k, q, sizeof(double) * k);
  }
}

/* bf_solve with the degree a constant in each case, so that the compiler unrolls the k x k
 * loops (a 3x faster solve at degree 2). */
#define SOLVE_CASE(D)                                                                       \
  case D:                                                                                   \
    solve_rows(D, weighted, table, n, step, params, stderr_, loss, rmse, r2, count, status, \
               trusted, qout);                                                              \
    break;
void bf_solve(int degree, int weighted, const double *table, int64_t n, const double *step,
              double *params, double *stderr_, double *loss, double *rmse, double *r2,
              int64_t *count, int8_t *status, uint8_t *trusted, double *qout) {
  switch (degree) {
    SOLVE_CASE(0) SOLVE_CASE(1) SOLVE_CASE(2) SOLVE_CASE(3) SOLVE_CASE(4) SOLVE_CASE(5)
    SOLVE_CASE(6) SOLVE_CASE(7) SOLVE_CASE(8) SOLVE_CASE(9) SOLVE_CASE(10)
  }
}

/* Run bookkeeping, for checkpoints: (last code, runs so far, whether the list is kept). */
void bf_get_state(agg *a, int64_t *out) {
  out[0] = a->last;
  out[1] = a->nruns;
  out[2] = a->runlist != NULL || a->nruns <= 1;
}

int bf_set_state(agg *a, int64_t last, int64_t nruns, const int64_t *runlist) {
  free(a->runlist);
  a->runlist = NULL;
  a->runcap = 0;
  a->last = last;
  a->nruns = nruns;
  if (runlist && nruns) {
    a->runlist = malloc(sizeof(int64_t) * nruns);
    if (!a->runlist) return BF_NO_MEMORY;
    memcpy(a->runlist, runlist, sizeof(int64_t) * nruns);
    a->runcap = nruns;
  }
  return 0;
}

/* ---------------------------------------------------------------- merging and refinement */

/* A row's sums re-expressed with the scales (ys, ws): exact, powers of two. */
static void rescale(double *row, int degree, int weighted, double ys, double ws) {
  int nm = nm_of(degree), k = degree + 1;
  double fy = ys / row[YSCALE], fw = ws / row[WSCALE];
  for (int b = 0; b < (weighted ? 2 : 1); b++) {
    double *S = row + HEADER + b * block_of(degree), *R = S + nm;
    double f = b == 0 ? fw : 1; /* the second block has unit weights */
    for (int m = 0; m < nm; m++) S[m] *= f;
    for (int j = 0; j < k; j++) R[j] *= f * fy;
    S[nm + k] *= f * fy * fy;
  }
  row[YSCALE] = ys;
  row[WSCALE] = ws;
}

static void shift_y(double *blk, int nm, int k, double d) {
  /* sums about YREF_src re-expressed about YREF_dst, with d = (YREF_src - YREF_dst) YSCALE */
  double *S = blk, *R = blk + nm, r0 = R[0];
  for (int j = 0; j < k; j++) R[j] += d * S[j];
  blk[nm + k] += 2 * d * r0 + d * d * S[0];
}

/* dst[i] += src[i] for n rows of two tables of one layout, each row in any frame; merged rows
 * end in their exact frame. */
void bf_merge(int degree, int weighted, double *dst, const double *src, int64_t n) {
  int64_t width = bf_width(degree, weighted);
  int nm = nm_of(degree), k = degree + 1, blk = block_of(degree);
  double tmp[HEADER + 2 * (MAX_M + MAX_DEGREE + 2)];
  for (int64_t i = 0; i < n; i++) {
    double *d = dst + i * width;
    const double *s = src + i * width;
    if (s[NPTS] == 0) continue;
    if (d[NPTS] == 0) {
      memcpy(d, s, sizeof(double) * width);
      continue;
    }
    double lo = fmin(d[LO], s[LO]), hi = fmax(d[HI], s[HI]);
    double centre = 0.5 * (lo + hi), half = 0.5 * (hi - lo);
    memcpy(tmp, s, sizeof(double) * width);
    reframe(tmp, degree, weighted, centre, half);
    reframe(d, degree, weighted, centre, half);
    double ys = fmin(d[YSCALE], tmp[YSCALE]), ws = fmin(d[WSCALE], tmp[WSCALE]);
    rescale(tmp, degree, weighted, ys, ws);
    rescale(d, degree, weighted, ys, ws);
    double shift = (tmp[YREF] - d[YREF]) * ys;
    shift_y(tmp + HEADER, nm, k, shift);
    if (weighted) shift_y(tmp + HEADER + blk, nm, k, shift);
    for (int j = HEADER; j < width; j++) d[j] += tmp[j];
    d[NPTS] += s[NPTS];
    d[LO] = lo;
    d[HI] = hi;
  }
}

/* Residual moments for one step of iterative refinement, for the rows whose ``flagged`` byte
 * is set: with q (rows x (D+1)) a row's Chebyshev coefficients of y - YREF in its (exact)
 * frame and r = y - YREF - sum_j q_j T_j(t), out (rows x (D+2), twice for weighted tables)
 * receives sum w r T_j and sum w r^2 (then the same with unit weights), all in the row's
 * scales (r of u = (y - YREF) YSCALE, weights w WSCALE). */
#define DEFINE_RESIDUAL(T, TN)                                                              \
  int bf_residual_##TN(int degree, int weighted, const double *table, int64_t rows,        \
                       int64_t n, const int64_t *codes, int64_t offset, const T *x,        \
                       const T *y, const T *w, const uint8_t *flagged, const double *q,    \
                       double *out) {                                                      \
    int64_t width = bf_width(degree, weighted);                                            \
    int k = degree + 1, ow = (k + 1) * (weighted ? 2 : 1);                                 \
    for (int64_t i = 0; i < n; i++) {                                                      \
      int64_t code = codes[i] - offset;                                                    \
      if (code < 0 || code >= rows) return BF_BAD_CODE;                                             \
      if (!flagged[code]) continue;                                                        \
      double xv = x[i], yv = y[i], wv = w ? (double)w[i] : 1.0;                           \
      if (!valid(xv, yv, wv)) continue;                                                    \
      const double *row = table + code * width, *qc = q + code * k;                        \
      double t = (xv - row[CENTRE]) * row[INVH], tm[MAX_DEGREE + 1];                       \
      tm[0] = 1;                                                                           \
      if (k > 1) tm[1] = t;                                                                \
      for (int j = 2; j < k; j++) tm[j] = 2 * t * tm[j - 1] - tm[j - 2];                  \
      double r = (yv - row[YREF]) * row[YSCALE];                                           \
      for (int j = 0; j < k; j++) r -= qc[j] * tm[j];                                      \
      double *o = out + code * ow;                                                         \
      wv *= row[WSCALE];                                                                   \
      for (int j = 0; j < k; j++) o[j] += wv * r * tm[j];                                  \
      o[k] += wv * r * r;                                                                  \
      if (weighted) {                                                                      \
        for (int j = 0; j < k; j++) o[k + 1 + j] += r * tm[j];                             \
        o[2 * k + 1] += r * r;                                                             \
      }                                                                                    \
    }                                                                                      \
    return 0;                                                                              \
  }
DEFINE_RESIDUAL(float, f32)
DEFINE_RESIDUAL(double, f64)

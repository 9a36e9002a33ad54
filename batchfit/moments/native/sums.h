/* The inner loops of aggregate.c for one degree D, input type T (float or double) and
 * weighting W (0 or 1), so that every loop bound is a constant the compiler unrolls and
 * vectorises. aggregate.c includes this file once per combination, with D, T, TN and W set.
 */
#define NM (2 * D + 1)
#define K (D + 1)
#define RUN_FN XCAT(XCAT(XCAT(run_, D), XCAT(_, TN)), XCAT(_w, W))
#define POINTS_FN XCAT(XCAT(points_, D), XCAT(_w, W))
#define LOAD XCAT(load_, TN)

/* Accumulate one point (t, yy, weight w, used v) into the register sums. */
#define ACCUMULATE(s, r, yy2, su, ru, yyu, t, yy, w, v)                                   \
  do {                                                                                     \
    double tm1_ = 1, tc_ = (t), tn_;                                                       \
    s[0] += (w);                                                                           \
    r[0] += (w) * (yy);                                                                    \
    if (W) { su[0] += (v); ru[0] += (v) * (yy); }                                          \
    if (NM > 1) {                                                                          \
      s[1] += (w) * tc_;                                                                   \
      if (W) su[1] += (v) * tc_;                                                           \
      if (K > 1) { r[1] += (w) * (yy) * tc_; if (W) ru[1] += (v) * (yy) * tc_; }          \
    }                                                                                      \
    for (int m_ = 2; m_ < NM; m_++) {                                                      \
      tn_ = 2 * (t) * tc_ - tm1_;                                                          \
      tm1_ = tc_;                                                                          \
      tc_ = tn_;                                                                           \
      s[m_] += (w) * tc_;                                                                  \
      if (W) su[m_] += (v) * tc_;                                                          \
      if (m_ < K) { r[m_] += (w) * (yy) * tc_; if (W) ru[m_] += (v) * (yy) * tc_; }       \
    }                                                                                      \
    yy2 += (w) * (yy) * (yy);                                                              \
    if (W) yyu += (v) * (yy) * (yy);                                                       \
  } while (0)

static void XCAT(store_, XCAT(XCAT(D, TN), W))(double *row, const double *s, const double *r,
                                               double yy2, const double *su,
                                               const double *ru, double yyu, double used) {
  double *S = row + HEADER;
  for (int m = 0; m < NM; m++) S[m] += s[m];
  for (int m = 0; m < K; m++) S[NM + m] += r[m];
  S[NM + K] += yy2;
  if (W) {
    double *U = S + NM + K + 1;
    for (int m = 0; m < NM; m++) U[m] += su[m];
    for (int m = 0; m < K; m++) U[NM + m] += ru[m];
    U[NM + K] += yyu;
  }
  row[NPTS] += used;
}

/* A run of n points of one series (arrays of T; w is NULL when W == 0). */
static void RUN_FN(agg *a, double *row, int64_t n, const T *x, const T *y, const T *w) {
  int64_t p = 0;
  double first_y = 0;
  for (; p < n; p++) /* the first used point gives the y reference */
    if (valid(x[p], y[p], W ? (double)w[p] : 1.0)) { first_y = y[p]; break; }
  if (p == n) return;
  /* the range of the used points (and their largest |y| and w), LANES at a time */
  vd lo = VD(INFINITY), hi = VD(-INFINITY), ym = VD(0), wm = VD(0);
  vi used = VI(0);
  int64_t q = p;
  for (; q + LANES <= n; q += LANES) {
    vd xv = LOAD(x + q), yv = LOAD(y + q), wv = W ? LOAD(w + q) : VD(1);
    vi in = usable(xv, yv, wv);
    vd ya = keep(blend(yv < 0, -yv, yv), in);
    used -= in;
    lo = blend(in & (xv < lo), xv, lo);
    hi = blend(in & (xv > hi), xv, hi);
    ym = blend(ya > ym, ya, ym);
    if (W) wm = blend(in & (wv > wm), wv, wm);
  }
  double lo1 = INFINITY, hi1 = -INFINITY, ym1 = 0, wm1 = W ? 0 : 1;
  int64_t count = 0;
  for (int l = 0; l < LANES; l++) {
    lo1 = lo[l] < lo1 ? lo[l] : lo1;
    hi1 = hi[l] > hi1 ? hi[l] : hi1;
    ym1 = ym[l] > ym1 ? ym[l] : ym1;
    if (W) wm1 = wm[l] > wm1 ? wm[l] : wm1;
    count += used[l];
  }
  for (; q < n; q++) {
    if (!valid(x[q], y[q], W ? (double)w[q] : 1.0)) continue;
    count++;
    lo1 = x[q] < lo1 ? x[q] : lo1;
    hi1 = x[q] > hi1 ? x[q] : hi1;
    ym1 = fabs((double)y[q]) > ym1 ? fabs((double)y[q]) : ym1;
    if (W) wm1 = (double)w[q] > wm1 ? (double)w[q] : wm1;
  }
  widen(a, row, lo1, hi1, first_y, ym1, wm1);
  /* the sums, LANES at a time, in the row's scales */
  double c = row[CENTRE], ih = row[INVH], yr = row[YREF], ys = row[YSCALE], ws = row[WSCALE];
  vd vc = VD(c), vih = VD(ih), vyr = VD(yr), vys = VD(ys), vws = VD(ws), one = VD(1);
  vd s[NM], r[K], yy2 = VD(0), su[W ? NM : 1], ru[W ? K : 1], yyu = VD(0);
  for (int m = 0; m < NM; m++) { s[m] = VD(0); if (W) su[m] = VD(0); }
  for (int m = 0; m < K; m++) { r[m] = VD(0); if (W) ru[m] = VD(0); }
  for (q = p; q + LANES <= n; q += LANES) {
    vd xv = LOAD(x + q), yv = LOAD(y + q), wv = W ? LOAD(w + q) : one;
    vi in = usable(xv, yv, wv);
    vd v = keep(one, in), t = keep((xv - vc) * vih, in), yy = keep((yv - vyr) * vys, in);
    vd wt = W ? keep(wv * vws, in) : v, wy = wt * yy, vy = v * yy;
    vd tm1 = one, tc = t, tn;
    s[0] += wt;
    r[0] += wy;
    if (W) { su[0] += v; ru[0] += vy; }
    if (NM > 1) {
      s[1] += wt * tc;
      if (W) su[1] += v * tc;
      if (K > 1) { r[1] += wy * tc; if (W) ru[1] += vy * tc; }
    }
#pragma GCC unroll 32
    for (int m = 2; m < NM; m++) {
      tn = 2 * t * tc - tm1;
      tm1 = tc;
      tc = tn;
      s[m] += wt * tc;
      if (W) su[m] += v * tc;
      if (m < K) { r[m] += wy * tc; if (W) ru[m] += vy * tc; }
    }
    yy2 += wy * yy;
    if (W) yyu += vy * yy;
  }
  double st[NM] = {0}, rt[K] = {0}, y2t = 0, sut[NM] = {0}, rut[K] = {0}, yut = 0;
  for (int l = 0; l < LANES; l++) {
    for (int m = 0; m < NM; m++) { st[m] += s[m][l]; if (W) sut[m] += su[m][l]; }
    for (int m = 0; m < K; m++) { rt[m] += r[m][l]; if (W) rut[m] += ru[m][l]; }
    y2t += yy2[l];
    if (W) yut += yyu[l];
  }
  for (; q < n; q++) {
    double xv = x[q], yv = y[q], wv = W ? (double)w[q] : 1.0;
    if (!valid(xv, yv, wv)) continue;
    ACCUMULATE(st, rt, y2t, sut, rut, yut, (xv - c) * ih, (yv - yr) * ys, wv * ws, 1.0);
  }
  XCAT(store_, XCAT(XCAT(D, TN), W))(row, st, rt, y2t, sut, rut, yut, (double)count);
}

#if IS_DOUBLE
/* A few buffered points of one series (scattered input). */
static void POINTS_FN(agg *a, double *row, int64_t n, const double *xs, const double *ys,
                      const double *ws) {
  double lo = INFINITY, hi = -INFINITY, first_y = 0, ymax = 0, wmax = 0;
  int64_t used = 0;
  for (int64_t p = 0; p < n; p++) {
    if (!valid(xs[p], ys[p], ws[p])) continue;
    if (!used) first_y = ys[p];
    used++;
    lo = xs[p] < lo ? xs[p] : lo;
    hi = xs[p] > hi ? xs[p] : hi;
    ymax = fabs(ys[p]) > ymax ? fabs(ys[p]) : ymax;
    wmax = ws[p] > wmax ? ws[p] : wmax;
  }
  if (!used) return;
  widen(a, row, lo, hi, first_y, ymax, wmax);
  double c = row[CENTRE], ih = row[INVH], yr = row[YREF], ysc = row[YSCALE], wsc = row[WSCALE];
  double st[NM] = {0}, rt[K] = {0}, y2t = 0, sut[NM] = {0}, rut[K] = {0}, yut = 0;
  for (int64_t p = 0; p < n; p++) {
    if (!valid(xs[p], ys[p], ws[p])) continue;
    ACCUMULATE(st, rt, y2t, sut, rut, yut, (xs[p] - c) * ih, (ys[p] - yr) * ysc, ws[p] * wsc,
               1.0);
  }
  XCAT(store_, XCAT(XCAT(D, TN), W))(row, st, rt, y2t, sut, rut, yut, (double)used);
}
#endif

#undef NM
#undef K
#undef RUN_FN
#undef POINTS_FN
#undef LOAD
#undef ACCUMULATE

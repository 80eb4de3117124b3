// Per-element arithmetic of the fused pseudospectral solver kernels (kernels/spectral.cu), shared by
// the GPU (NVRTC/nvcc) and the host tests (g++), which compare it with the Python equations.
//
// Layout (emu's convention, python/emu/grid.py): spectral arrays are rfft2 over the last two axes,
// C-contiguous, complex stored as interleaved (re, im) pairs (numpy complex64/128, CUDA float2/double2);
// one (n, m = n/2 + 1) plane per sample (and layer); physical planes (n, n), x the fastest axis.
// Wavenumbers are angular, k = (2 pi / L) index, computed from the element's index rather than read
// from tables: one memory stream fewer per kernel, and the same numbers numpy builds
// (rfftfreq/fftfreq indices times 2 pi / L; the y index of row r is r for r < n/2, else r - n).
// Per-wavenumber tables that are not simple functions of the index (dealiasing mask, spectral filter,
// forcing, linear operator) are read from (n, m) arrays shared by every sample.
//
// Kolmogorov flow (python/emu/systems/kolmogorov.py; jax-cfd ForcedNavierStokes2D):
//   psi_hat = omega_hat / |k|^2,  u_hat = i ky psi_hat,  v_hat = -i kx psi_hat
//   N(omega_hat) = -mask * FFT(u d(omega)/dx + v d(omega)/dy) + F_hat
// Two-layer QG (python/emu/systems/qg.py; pyqg QGModel):
//   [psi1, psi2] = A [q1, q2],  A = M^-1,  M = [[-(k2 + F1), F1], [F2, -(k2 + F2)]],
//   det M = k2 (k2 + F1 + F2), the mean mode (k2 = 0) set to 0
//   u_hat = -i ky psi_hat, v_hat = i kx psi_hat, fluxes (u + U_m) q and v q in physical space
//   dq_m/dt = -i kx FFT((u + U_m) q) - i ky FFT(v q) - i kx beta_m psi_m + delta_{m,2} r_ek k2 psi_2
// Time steppers (python/emu/solvers/time_stepping.py):
//   CN-RK4 stage k (Carpenter-Kennedy low-storage IMEX RK, jax-cfd crank_nicolson_rk4):
//     h <- N(u) + beta_k h,  u <- ((1 + mu L) u + gamma_k dt h) / (1 - mu L),  mu = dt (a_{k+1} - a_k)/2
//   AB3 (pyqg): q <- filter (q + dt (c0 f_n + c1 f_{n-1} + c2 f_{n-2}))
//     (c = (1, 0, 0) forward Euler, (3/2, -1/2, 0) AB2, (23/12, -16/12, 5/12) AB3)
//
// The operations are written in the order of the Python reference, so the host build with
// -ffp-contract=off reproduces numpy's float64 result up to the rounding of constants the reference
// precomputes in float64 (its float32 tables are float64 values rounded once, these are computed in
// float32); on the GPU, NVRTC contracts a*b + c into FMAs, a further last-bit difference.
#ifndef EMU_SPECTRAL_CUH
#define EMU_SPECTRAL_CUH

#include "emu_common.cuh"

namespace emu {

// A complex number laid out as numpy's complex64/complex128 and CUDA's float2/double2.
template <typename T>
struct alignas(2 * sizeof(T)) complex_t {
    T re;
    T im;
};

template <typename T>
EMU_HD complex_t<T> make_complex(T re, T im) {
    complex_t<T> z;
    z.re = re;
    z.im = im;
    return z;
}

template <typename T>
EMU_HD complex_t<T> operator+(complex_t<T> a, complex_t<T> b) {
    return make_complex(a.re + b.re, a.im + b.im);
}

// (a.re + i a.im)(b.re + i b.im), the textbook formula numpy uses.
template <typename T>
EMU_HD complex_t<T> operator*(complex_t<T> a, complex_t<T> b) {
    return make_complex(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re);
}

// A real factor times a complex number.
template <typename T>
EMU_HD complex_t<T> operator*(T a, complex_t<T> z) {
    return make_complex(a * z.re, a * z.im);
}

// (i a) z for real a: a spectral derivative factor such as i kx. Equal to numpy's complex product
// (0 + i a) z, whose 0 * z terms add exact zeros.
template <typename T>
EMU_HD complex_t<T> times_i(T a, complex_t<T> z) {
    return make_complex(-(a * z.im), a * z.re);
}

// Index along an n-point FFT axis: 0, 1, ..., n/2 - 1, -n/2, ..., -1 (numpy's fftfreq times n).
EMU_HD int signed_index(int row, int n) {
    return row < n / 2 ? row : row - n;
}

// Angular wavenumbers of element j of an (n, m = n/2 + 1) rfft2 plane.
template <typename T>
struct wavenumber_t {
    T kx;
    T ky;
    T k2;          // kx^2 + ky^2
    T inverse_k2;  // 1 / k2, and 0 for the mean mode
};

template <typename T>
EMU_HD wavenumber_t<T> wavenumber_at(long long j, int n, int m, T fundamental) {
    // j < n m fits an int: 32-bit division, several times cheaper on the GPU than 64-bit.
    const int row = (int)j / m;
    const int col = (int)j - row * m;
    wavenumber_t<T> w;
    w.kx = fundamental * (T)col;
    w.ky = fundamental * (T)signed_index(row, n);
    w.k2 = w.kx * w.kx + w.ky * w.ky;
    w.inverse_k2 = w.k2 > T(0) ? T(1) / w.k2 : T(0);
    return w;
}

// ---------------------------------------------------------------------------------------------------
// Kolmogorov flow
// ---------------------------------------------------------------------------------------------------

// Inputs of the four inverse transforms of the advection term, element i of omega_hat (batch, n, m),
// written to out (4, batch, n, m): u_hat = (i ky / k2) w, v_hat = (-i kx / k2) w, i kx w, i ky w.
template <typename T>
EMU_HD void kolmogorov_gradients_at(long long i, const complex_t<T>* omega_hat, complex_t<T>* out, long long count,
                                    int n, int m, T fundamental) {
    const wavenumber_t<T> w = wavenumber_at<T>(i % ((long long)n * m), n, m, fundamental);
    const complex_t<T> omega = omega_hat[i];
    out[i] = times_i(w.ky * w.inverse_k2, omega);
    out[count + i] = times_i(-(w.kx * w.inverse_k2), omega);
    out[2 * count + i] = times_i(w.kx, omega);
    out[3 * count + i] = times_i(w.ky, omega);
}

// u d(omega)/dx + v d(omega)/dy at element i of a physical plane; `physical` is (4, batch, n, n) holding
// u, v, d(omega)/dx, d(omega)/dy, each multiplied by 1/scale (scale = 1/n^2 undoes an unnormalised
// inverse FFT, saving the separate normalisation pass; pass 1 for normalised fields).
template <typename T>
EMU_HD void advection_product_at(long long i, const T* physical, T* out, long long count, T scale) {
    const T u = physical[i] * scale;
    const T v = physical[count + i] * scale;
    const T omega_x = physical[2 * count + i] * scale;
    const T omega_y = physical[3 * count + i] * scale;
    out[i] = u * omega_x + v * omega_y;
}

// N = -mask * advection_hat + F_hat: the dealiased advection with its minus sign, plus the forcing.
template <typename T>
EMU_HD complex_t<T> kolmogorov_tendency(complex_t<T> advection_hat, T mask, complex_t<T> forcing_hat) {
    return (-mask) * advection_hat + forcing_hat;
}

// One CN-RK4 stage at one element, updating h and u in place:
//   h <- N + beta h  (h <- N on the first stage, has_history = false)
//   u <- (1 + mu L)/(1 - mu L) u + gamma_dt/(1 - mu L) h
template <typename T>
EMU_HD void cn_rk4_stage(complex_t<T> tendency, complex_t<T>& h, bool has_history, T beta, complex_t<T>& u,
                         T linear, T mu, T gamma_dt) {
    h = has_history ? tendency + beta * h : tendency;
    const T decay = (T(1) + mu * linear) / (T(1) - mu * linear);
    const T gain = gamma_dt / (T(1) - mu * linear);
    u = decay * u + gain * h;
}

// Kolmogorov's explicit terms at element i of (batch, n, m); tables mask, forcing_hat are (n, m).
template <typename T>
EMU_HD void kolmogorov_tendency_at(long long i, const complex_t<T>* advection_hat, const T* mask,
                                   const complex_t<T>* forcing_hat, complex_t<T>* out, long long plane) {
    const long long j = i % plane;
    out[i] = kolmogorov_tendency(advection_hat[i], mask[j], forcing_hat[j]);
}

// A whole CN-RK4 stage of Kolmogorov flow at element i: the tendency's spectral tail (mask, sign,
// forcing) and the stage update in one pass. u_in may be u_out (later stages update in place); h is
// read only when has_history != 0.
template <typename T>
EMU_HD void kolmogorov_cn_rk4_stage_at(long long i, const complex_t<T>* advection_hat, const T* mask,
                                       const complex_t<T>* forcing_hat, const T* linear, const complex_t<T>* u_in,
                                       complex_t<T>* u_out, complex_t<T>* h, int has_history, T beta, T mu,
                                       T gamma_dt, long long plane) {
    const long long j = i % plane;
    const complex_t<T> tendency = kolmogorov_tendency(advection_hat[i], mask[j], forcing_hat[j]);
    complex_t<T> h_i = has_history ? h[i] : tendency;
    complex_t<T> u_i = u_in[i];
    cn_rk4_stage(tendency, h_i, has_history != 0, beta, u_i, linear[j], mu, gamma_dt);
    h[i] = h_i;
    u_out[i] = u_i;
}

// ---------------------------------------------------------------------------------------------------
// Two-layer QG
// ---------------------------------------------------------------------------------------------------

// PV inversion at one wavenumber: psi = A q with A = M^-1 (see the top of this file).
template <typename T>
EMU_HD void qg_invert(complex_t<T> q1, complex_t<T> q2, T k2, T f1, T f2, complex_t<T>& psi1, complex_t<T>& psi2) {
    const T determinant = k2 * (k2 + f1 + f2);
    const T inverse = determinant > T(0) ? T(1) / determinant : T(0);
    const T a11 = -(k2 + f2) * inverse;
    const T a12 = -f1 * inverse;
    const T a21 = -f2 * inverse;
    const T a22 = -(k2 + f1) * inverse;
    psi1 = a11 * q1 + a12 * q2;
    psi2 = a21 * q1 + a22 * q2;
}

// Index bookkeeping of the QG kernels: one thread per (sample, wavenumber) pair handles both layers,
// which the inversion couples. State q_hat is (batch, 2, n, m); `pairs` = batch n m.
struct qg_pair_t {
    long long layer1;  // flat index of layer 1 of this pair in (batch, 2, n, m)
    long long layer2;
    long long j;       // index within the (n, m) plane
};

EMU_HD qg_pair_t qg_pair_at(long long i, long long plane) {
    qg_pair_t p;
    const long long sample = i / plane;
    p.j = i % plane;
    p.layer1 = 2 * sample * plane + p.j;
    p.layer2 = p.layer1 + plane;
    return p;
}

// Inputs of the three inverse transforms of the QG tendency, pair i: out (3, batch, 2, n, m) gets
// q_hat, u_hat = -i ky psi_hat and v_hat = i kx psi_hat for both layers.
template <typename T>
EMU_HD void qg_inversion_velocities_at(long long i, const complex_t<T>* q_hat, complex_t<T>* out, long long pairs,
                                       int n, int m, T fundamental, T f1, T f2) {
    const long long plane = (long long)n * m;
    const long long count = 2 * pairs;  // elements of one (batch, 2, n, m) array
    const qg_pair_t p = qg_pair_at(i, plane);
    const wavenumber_t<T> w = wavenumber_at<T>(p.j, n, m, fundamental);
    const complex_t<T> q1 = q_hat[p.layer1];
    const complex_t<T> q2 = q_hat[p.layer2];
    complex_t<T> psi1, psi2;
    qg_invert(q1, q2, w.k2, f1, f2, psi1, psi2);
    out[p.layer1] = q1;
    out[p.layer2] = q2;
    out[count + p.layer1] = times_i(-w.ky, psi1);
    out[count + p.layer2] = times_i(-w.ky, psi2);
    out[2 * count + p.layer1] = times_i(w.kx, psi1);
    out[2 * count + p.layer2] = times_i(w.kx, psi2);
}

// Fluxes at element i of a (batch, 2, n, n) physical array: `physical` (3, batch, 2, n, n) holds q, u, v
// times 1/scale (see advection_product_at); out (2, batch, 2, n, n) gets (u + U_m) q and v q, where
// U_m is the background zonal velocity of the element's layer.
template <typename T>
EMU_HD void qg_fluxes_at(long long i, const T* physical, T* out, long long count, long long plane, T upper_velocity,
                         T lower_velocity, T scale) {
    const T background = (i / plane) % 2 == 0 ? upper_velocity : lower_velocity;
    const T q = physical[i] * scale;
    const T u = physical[count + i] * scale + background;
    const T v = physical[2 * count + i] * scale;
    out[i] = u * q;
    out[count + i] = v * q;
}

// dq/dt of both layers at pair i from the transformed fluxes (2, batch, 2, n, m) and q_hat:
//   -i kx Fu_m - i ky Fv_m - i kx beta_m psi_m (+ r_ek k2 psi_2 in the lower layer)
template <typename T>
EMU_HD void qg_tendency_pair(const complex_t<T>* fluxes_hat, const complex_t<T>* q_hat, qg_pair_t p, long long count,
                             wavenumber_t<T> w, T f1, T f2, T beta1, T beta2, T drag, complex_t<T>& t1,
                             complex_t<T>& t2) {
    complex_t<T> psi1, psi2;
    qg_invert(q_hat[p.layer1], q_hat[p.layer2], w.k2, f1, f2, psi1, psi2);
    // pyqg's psi factors, as emu.systems.qg builds them: -(i kx beta_1) and -(i kx beta_2 - r_ek k2).
    const complex_t<T> psi_factor1 = make_complex(T(0), -(beta1 * w.kx));
    const complex_t<T> psi_factor2 = make_complex(drag * w.k2, -(beta2 * w.kx));
    t1 = times_i(-w.kx, fluxes_hat[p.layer1]) + times_i(-w.ky, fluxes_hat[count + p.layer1]) + psi_factor1 * psi1;
    t2 = times_i(-w.kx, fluxes_hat[p.layer2]) + times_i(-w.ky, fluxes_hat[count + p.layer2]) + psi_factor2 * psi2;
}

// The QG tendency alone (for steppers other than AB3), pair i: out (batch, 2, n, m).
template <typename T>
EMU_HD void qg_tendency_at(long long i, const complex_t<T>* fluxes_hat, const complex_t<T>* q_hat, complex_t<T>* out,
                           long long pairs, int n, int m, T fundamental, T f1, T f2, T beta1, T beta2, T drag) {
    const long long plane = (long long)n * m;
    const qg_pair_t p = qg_pair_at(i, plane);
    const wavenumber_t<T> w = wavenumber_at<T>(p.j, n, m, fundamental);
    complex_t<T> t1, t2;
    qg_tendency_pair(fluxes_hat, q_hat, p, 2 * pairs, w, f1, f2, beta1, beta2, drag, t1, t2);
    out[p.layer1] = t1;
    out[p.layer2] = t2;
}

// q <- filter (q + dt (c0 f0 + c1 f1 + c2 f2)) at one element; f1, f2 enter only when num_previous
// says they exist (so the start-up steps never read history that is not there).
template <typename T>
EMU_HD complex_t<T> ab3_update(complex_t<T> q, complex_t<T> f0, complex_t<T> f1, complex_t<T> f2, int num_previous,
                               T c0, T c1, T c2, T dt, T filter) {
    complex_t<T> combination = c0 * f0;
    if (num_previous >= 1) combination = combination + c1 * f1;
    if (num_previous >= 2) combination = combination + c2 * f2;
    return filter * (q + dt * combination);
}

// A whole AB3 step of QG at pair i: tendency (written to tendency_out, the next step's history) and
// the filtered update (q_out), both layers. previous1/previous2 (batch, 2, n, m) are f_{n-1}, f_{n-2}.
template <typename T>
EMU_HD void qg_ab3_step_at(long long i, const complex_t<T>* fluxes_hat, const complex_t<T>* q_hat,
                           const complex_t<T>* previous1, const complex_t<T>* previous2, int num_previous,
                           const T* filter, complex_t<T>* tendency_out, complex_t<T>* q_out, long long pairs, int n,
                           int m, T fundamental, T f1, T f2, T beta1, T beta2, T drag, T c0, T c1, T c2, T dt) {
    const long long plane = (long long)n * m;
    const qg_pair_t p = qg_pair_at(i, plane);
    const wavenumber_t<T> w = wavenumber_at<T>(p.j, n, m, fundamental);
    complex_t<T> t1, t2;
    qg_tendency_pair(fluxes_hat, q_hat, p, 2 * pairs, w, f1, f2, beta1, beta2, drag, t1, t2);
    const complex_t<T> zero = make_complex(T(0), T(0));
    const long long layers[2] = {p.layer1, p.layer2};
    const complex_t<T> tendencies[2] = {t1, t2};
    for (int layer = 0; layer < 2; ++layer) {
        const long long k = layers[layer];
        const complex_t<T> g1 = num_previous >= 1 ? previous1[k] : zero;
        const complex_t<T> g2 = num_previous >= 2 ? previous2[k] : zero;
        tendency_out[k] = tendencies[layer];
        q_out[k] = ab3_update(q_hat[k], tendencies[layer], g1, g2, num_previous, c0, c1, c2, dt, filter[p.j]);
    }
}

}  // namespace emu

#endif  // EMU_SPECTRAL_CUH

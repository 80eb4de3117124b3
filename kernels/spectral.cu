// Fused elementwise kernels of emu's pseudospectral solvers (Kolmogorov flow and two-layer QG), in
// float (suffix _f32) and double (_f64); complex arrays as interleaved pairs (float2/double2).
//
// Between its FFTs, one right-hand-side evaluation is a chain of elementwise products that an eager
// array library runs as separate passes over memory; each kernel here is one pass (each array read
// and written once). Per step:
//   Kolmogorov CN-RK4 stage:  kolmogorov_gradients -> irfft2 -> advection_product -> rfft2
//                             -> kolmogorov_cn_rk4_stage (mask, forcing, h and u updates)
//   QG AB3 step:              qg_inversion_velocities -> irfft2 -> qg_fluxes -> rfft2
//                             -> qg_ab3_step (tendency, AB3 combination, filter)
// plus kolmogorov_tendency / qg_tendency for the right-hand side alone (other steppers, diagnostics).
// The math lives in spectral.cuh; launchers and documentation of the arguments in
// python/emu/solvers/fused.py. Counts are 64-bit (long long), grid sizes int, scalars of the element
// type. Compiled by NVRTC through emu.cuda.raw_module("spectral.cu"), by nvcc -ptx in CI, and by g++
// on the host for the tests (see emu_common.cuh).
#include "spectral.cuh"

#define EMU_SPECTRAL_KERNELS(T, S)                                                                                \
    /* omega_hat (batch, n, m) -> out (4, batch, n, m); count = batch n m */                                     \
    EMU_KERNEL kolmogorov_gradients_##S(const emu::complex_t<T>* omega_hat, emu::complex_t<T>* out,              \
                                        long long count, int n, int m, T fundamental) {                          \
        EMU_FOR_EACH(i, count) emu::kolmogorov_gradients_at<T>(i, omega_hat, out, count, n, m, fundamental);      \
    }                                                                                                             \
    /* physical (4, batch, n, n) -> out (batch, n, n); count = batch n n */                                     \
    EMU_KERNEL advection_product_##S(const T* physical, T* out, long long count, T scale) {                     \
        EMU_FOR_EACH(i, count) emu::advection_product_at<T>(i, physical, out, count, scale);                     \
    }                                                                                                             \
    /* advection_hat (batch, n, m), tables (n, m) -> out (batch, n, m); count = batch n m, plane = n m */        \
    EMU_KERNEL kolmogorov_tendency_##S(const emu::complex_t<T>* advection_hat, const T* mask,                    \
                                       const emu::complex_t<T>* forcing_hat, emu::complex_t<T>* out,             \
                                       long long count, long long plane) {                                       \
        EMU_FOR_EACH(i, count) emu::kolmogorov_tendency_at<T>(i, advection_hat, mask, forcing_hat, out, plane);   \
    }                                                                                                             \
    EMU_KERNEL kolmogorov_cn_rk4_stage_##S(const emu::complex_t<T>* advection_hat, const T* mask,                \
                                           const emu::complex_t<T>* forcing_hat, const T* linear,                \
                                           const emu::complex_t<T>* u_in, emu::complex_t<T>* u_out,              \
                                           emu::complex_t<T>* h, int has_history, T beta, T mu, T gamma_dt,      \
                                           long long count, long long plane) {                                   \
        EMU_FOR_EACH(i, count)                                                                                    \
        emu::kolmogorov_cn_rk4_stage_at<T>(i, advection_hat, mask, forcing_hat, linear, u_in, u_out, h,          \
                                           has_history, beta, mu, gamma_dt, plane);                               \
    }                                                                                                             \
    /* q_hat (batch, 2, n, m) -> out (3, batch, 2, n, m); pairs = batch n m (one thread per wavenumber) */       \
    EMU_KERNEL qg_inversion_velocities_##S(const emu::complex_t<T>* q_hat, emu::complex_t<T>* out,              \
                                           long long pairs, int n, int m, T fundamental, T f1, T f2) {          \
        EMU_FOR_EACH(i, pairs) emu::qg_inversion_velocities_at<T>(i, q_hat, out, pairs, n, m, fundamental, f1, f2); \
    }                                                                                                             \
    /* physical (3, batch, 2, n, n) -> out (2, batch, 2, n, n); count = batch 2 n n, plane = n n */             \
    EMU_KERNEL qg_fluxes_##S(const T* physical, T* out, long long count, long long plane, T upper_velocity,      \
                             T lower_velocity, T scale) {                                                         \
        EMU_FOR_EACH(i, count)                                                                                    \
        emu::qg_fluxes_at<T>(i, physical, out, count, plane, upper_velocity, lower_velocity, scale);             \
    }                                                                                                             \
    EMU_KERNEL qg_tendency_##S(const emu::complex_t<T>* fluxes_hat, const emu::complex_t<T>* q_hat,              \
                               emu::complex_t<T>* out, long long pairs, int n, int m, T fundamental, T f1, T f2, \
                               T beta1, T beta2, T drag) {                                                        \
        EMU_FOR_EACH(i, pairs)                                                                                    \
        emu::qg_tendency_at<T>(i, fluxes_hat, q_hat, out, pairs, n, m, fundamental, f1, f2, beta1, beta2, drag); \
    }                                                                                                             \
    EMU_KERNEL qg_ab3_step_##S(const emu::complex_t<T>* fluxes_hat, const emu::complex_t<T>* q_hat,              \
                               const emu::complex_t<T>* previous1, const emu::complex_t<T>* previous2,           \
                               int num_previous, const T* filter, emu::complex_t<T>* tendency_out,               \
                               emu::complex_t<T>* q_out, long long pairs, int n, int m, T fundamental, T f1,     \
                               T f2, T beta1, T beta2, T drag, T c0, T c1, T c2, T dt) {                          \
        EMU_FOR_EACH(i, pairs)                                                                                    \
        emu::qg_ab3_step_at<T>(i, fluxes_hat, q_hat, previous1, previous2, num_previous, filter, tendency_out,   \
                               q_out, pairs, n, m, fundamental, f1, f2, beta1, beta2, drag, c0, c1, c2, dt);     \
    }

EMU_SPECTRAL_KERNELS(float, f32)
EMU_SPECTRAL_KERNELS(double, f64)

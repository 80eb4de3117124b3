"""The score of a whole sequence composed from a network that scores windows of W frames (SDA).

For a sequence x = (x_1 .. x_T) that is a Markov chain of order k, the score of frame i at t = 0
depends only on its Markov blanket x_{i-k} .. x_{i+k}:

    grad_{x_i} log p(x_1:T) = grad_{x_i} log p(x_{i-k} .. x_{i+k})      (restricted to existing frames),

so a network that learned the score of the marginal of W >= 2k + 1 consecutive frames gives every
frame's score, read from a window in which the frame's blanket lies inside. Rozet & Louppe (2023)
compose the full score that way and use it at all diffusion times t (where it is an approximation:
the noisy x_t is no longer Markov, but the error is small while sigma(t) is small and where the
noise dominates the score anyway). Here every frame takes its score from the window in which it is
most central:

    window of frame i (0-based) = frames s_i .. s_i + W - 1,   s_i = max(0, min(i - W//2, T - W)),

i.e. frame i sits at position W//2 of its window, except the first W//2 frames (taken from the first
window) and the last ones (from the last window): SDA's `MCScoreNet.fold` for W = 2k + 1. The
windows needed are all T - W + 1 windows of stride 1, evaluated in one batched call (or in chunks of
at most `max_windows`). For odd W the composition is exact at t = 0 for chains of order
k <= W//2; for even W the central position W//2 has W//2 - 1 frames to its right, so k <= W//2 - 1.

Strided windows (`stride` s > 1) evaluate only the windows starting at 0, s, 2s, ... (and the last
one, T - W), about (T - W)/s + 1 instead of T - W + 1, and each frame again takes its score from the
window of those in which it is most central (the larger of its distances to the window's two
ends; ties to the earlier window). With s <= W - 2k every frame away from the sequence's ends lies
at least k frames inside some window, so the composition stays exact at t = 0 for chains of order
k <= (W - s) / 2: W = 5, s = 3 is exact for first-order chains (a deterministic map sampled every
frame is one) with a third of the network calls. s = 1 is the rule above.

At t > 0 the composition is an approximation whose error peaks at intermediate t. Measured for a
stationary AR(1) chain of 2-d frames with exact window-marginal scores (tests/test_vp_sampler.py):
relative error 5e-8 / 4e-4 / 1.4e-2 at t = 0.01 / 0.1 / 0.3 for W = 5, and sampling 8-frame
sequences with the composed score biases their covariance (whitened eigenvalues 0.79 .. 1.20 for
W = 5, 0.59 .. 1.76 for W = 3, against 0.89 .. 1.02 with one window of all frames).

The composition is linear in what the window network returns, so it composes scores and noise
predictions eps_hat = -sigma score alike, and it is differentiable (guidance can differentiate
through it).

References:
    Rozet & Louppe (2023), "Score-based data assimilation", section 3 (composing local scores of a
    Markov chain) and code (`MCScoreNet.unfold`/`fold`).
    methods.md, "Cohesion" (windows of W = 5 frames composed into a full-sequence score).
"""

from __future__ import annotations

from typing import Callable

import torch

from emu.diffusion.vp import TimeLike, per_sample_times

WindowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def window_starts(length: int, window: int, stride: int = 1) -> torch.Tensor:
    """The first frame of frame i's window, i = 0 .. T-1 (int64): s_i = max(0, min(i - W//2, T - W)) for
    stride 1; for stride s, the start among `strided_starts` in whose window frame i is most central."""
    _check_window(length, window)
    _check_stride(stride, window)
    frames = torch.arange(length)
    if stride == 1:
        return (frames - window // 2).clamp(min=0, max=length - window)
    starts = strided_starts(length, window, stride)
    offset = frames[:, None] - starts[None, :]  # frame i's position in each window
    depth = torch.minimum(offset, window - 1 - offset)  # frames between it and the nearer end; < 0: outside
    # argmax returns the first maximum: ties go to the earlier window, as for stride 1 with even W.
    return starts[depth.argmax(dim=1)]


def strided_starts(length: int, window: int, stride: int = 1) -> torch.Tensor:
    """The windows evaluated: starts 0, s, 2s, ... <= T - W, and T - W itself (int64, increasing)."""
    _check_window(length, window)
    _check_stride(stride, window)
    starts = torch.arange(0, length - window + 1, stride)
    if int(starts[-1]) != length - window:
        starts = torch.cat([starts, torch.tensor([length - window])])
    return starts


def compose_window_scores(window_score: WindowFunction, x: torch.Tensor, t: TimeLike, window: int = 5, *,
                          stride: int = 1, max_windows: int | None = None) -> torch.Tensor:
    """The score (or eps_hat) of whole sequences x from the scores of their W-frame windows.

    Args:
        window_score: window_score(windows, t) -> same shape, on windows of shape (B', W, ...) with
            t of shape (B',); B' = B n (or chunks of it), n = T - W + 1 for stride 1 (the number of
            `strided_starts` otherwise), window j of sequence b in row b n + j, each with its
            sequence's time.
        x: (B, T, ...) sequences (e.g. (B, T, C, y, x)), floating point.
        t: scalar or (B,) diffusion times.
        window: W, the number of frames the network scores (>= 1, <= T).
        stride: s, the spacing of the windows evaluated (1 <= s <= W; module docstring).
        max_windows: at most this many windows per call of window_score (None: all in one call).

    Returns:
        (B, T, ...): frame i's entry from the window s_i .. s_i + W - 1 (module docstring).

    Raises:
        ValueError: T < W (the sequence is shorter than a window), bad shapes or arguments.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (batch, frames, ...), got {got}")
    batch, length = x.shape[0], x.shape[1]
    _check_window(length, window)
    if max_windows is not None and not (isinstance(max_windows, int) and not isinstance(max_windows, bool)
                                        and max_windows >= 1):
        raise ValueError(f"max_windows must be None or an integer >= 1, got {max_windows!r}")
    _check_stride(stride, window)
    rest = x.shape[2:]
    evaluated = strided_starts(length, window, stride).to(x.device)
    count = evaluated.numel()
    # (B, count, W, ...) -> (B count, W, ...): window j of sequence b in row b count + j.
    windows = x[:, evaluated[:, None] + torch.arange(window, device=x.device)].reshape(batch * count, window, *rest)
    times = per_sample_times(t, x).to(x.dtype).repeat_interleave(count)
    if max_windows is None or max_windows >= windows.shape[0]:
        scores = _call(window_score, windows, times)
    else:
        scores = torch.cat([_call(window_score, windows[i:i + max_windows], times[i:i + max_windows])
                            for i in range(0, windows.shape[0], max_windows)])
    scores = scores.reshape(batch, count, window, *rest)
    starts = window_starts(length, window, stride).to(x.device)
    positions = torch.arange(length, device=x.device) - starts
    return scores[:, torch.searchsorted(evaluated, starts), positions]


def _call(window_score: WindowFunction, windows: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    scores = window_score(windows, times)
    if not isinstance(scores, torch.Tensor) or scores.shape != windows.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"window_score must return the shape of its windows, {tuple(windows.shape)}, got {got}")
    return scores


def _check_window(length: int, window: int) -> None:
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if length < window:
        raise ValueError(f"the sequence has {length} frames, fewer than the window of {window}: "
                         f"composing window scores needs T >= W")


def _check_stride(stride: int, window: int) -> None:
    if not (isinstance(stride, int) and not isinstance(stride, bool) and 1 <= stride <= window):
        raise ValueError(f"stride must be an integer in [1, {window}] (the window; larger strides leave frames "
                         f"in no window), got {stride!r}")

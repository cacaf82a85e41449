"""The ETA of a running job: the work left, from what the tokenizing pass and the records
done tell, at the measured cost of a step.

Work left: the output tokens still to come (`Eta.tokens_left`) and the prompt tokens still
to compute (the records not started x the prompt tokens a started record computed, on
average: its share of a prefix computed once included).

Cost: between two reports a step took `dt` seconds (host work between steps included),
sampled `dO` tokens (one per sequence it decoded) and computed `dP` more (prompts).
`StepCosts` fits dt = c0 + c1 dO + c2 dP by least squares, forgetting old steps with time
constant COST_TIME_CONSTANT, so that it follows a job whose batch grows or shrinks. The
output left takes (tokens left / the batch running now, or at the last step that ran
some) steps, each at the fitted time of
a step of that batch; the prompts left, c2 a token. A job that starts with its prompts is
not timed at the pace of those prefill steps, as a moving average of tokens per second
was (3 to 7 times the job's time in its first tenth).
"""

from __future__ import annotations

import math

RATE_TIME_CONSTANT = 20.0  # seconds: the moving average of tokens/s forgets at this pace
COST_TIME_CONSTANT = 30.0  # seconds: the step costs forget old steps at this pace
_MIN_STEPS = 4  # steps fitted before the costs are used


class StepCosts:
    """Non-negative least squares of a step's seconds on x = (1, tokens sampled, other
    tokens computed), over exponentially forgotten sums: of the fits on every subset of x
    whose coefficients are all >= 0, the one with the least squared error (a negative cost
    is a feature the steps so far cannot tell apart; it is left out, not clamped). A tiny
    ridge keeps collinear steps (every step the same batch) solvable."""

    def __init__(self) -> None:
        self._xx = [[0.0] * 3 for _ in range(3)]  # sum of w x x^T
        self._xy = [0.0] * 3  # sum of w x dt
        self._yy = 0.0  # sum of w dt^2
        self.steps = 0

    def add(self, dt: float, sampled: float, computed: float) -> None:
        forget = math.exp(-dt / COST_TIME_CONSTANT)
        x = (1.0, sampled, computed)
        self._yy = self._yy * forget + dt * dt
        for i in range(3):
            self._xy[i] = self._xy[i] * forget + x[i] * dt
            for j in range(3):
                self._xx[i][j] = self._xx[i][j] * forget + x[i] * x[j]
        self.steps += 1

    def fit(self) -> tuple[float, float, float] | None:
        """(c0, c1, c2): seconds a step, a sampled token, a computed prompt token; None
        before _MIN_STEPS steps or when no fit says a step costs something."""
        if self.steps < _MIN_STEPS:
            return None
        best: tuple[float, list[float]] | None = None
        for subset in ((0, 1, 2), (0, 1), (1, 2), (0, 2), (0,), (1,), (2,)):
            a = [[self._xx[i][j] for j in subset] for i in subset]
            for k in range(len(subset)):
                a[k][k] += 1e-6 * max(a[k][k], 1.0)
            solved = _solve(a, [self._xy[i] for i in subset])
            if solved is None or min(solved) < 0:
                continue
            c = [0.0, 0.0, 0.0]
            for i, value in zip(subset, solved):
                c[i] = value
            error = (
                self._yy
                - 2 * sum(c[i] * self._xy[i] for i in range(3))
                + sum(c[i] * c[j] * self._xx[i][j] for i in range(3) for j in range(3))
            )
            if best is None or error < best[0] - 1e-12:
                best = (error, c)
        if best is None or not any(best[1]):
            return None
        c0, c1, c2 = best[1]
        return c0, c1, c2


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b (Gaussian elimination with partial pivoting), None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x if all(math.isfinite(v) for v in x) else None


class Eta:
    """Seconds left in a job, from its work left and the measured cost of its steps.

    The output tokens still to come are the records left times the mean output of the
    records finished (the `prior` until one has: the records' mean max_tokens x n, their
    own where they set it, once they are tokenized; failed records, which generate nothing,
    are left out of the mean), less what the running records have generated already. The
    cost of that work comes from `StepCosts` once a few steps are fitted (the engine's
    computed tokens told); until then, or without them, from an exponential moving average
    of output tokens per second (time constant RATE_TIME_CONSTANT), which is also the rate
    shown; between the two, every token left at the mean time a computed token took. A job
    that generates nothing (prior 0: choices are scored) takes the mean time per record
    done since the first step.
    """

    def __init__(self, records: int, prior_tokens_per_record: float) -> None:
        self.records = records
        self.prior = prior_tokens_per_record
        self.rate: float | None = None  # output tokens per second, smoothed
        self.records_done = 0
        self.records_ran = 0  # records done that ran (not error lines)
        self.costs = StepCosts()
        self._finished_tokens = 0  # output tokens of the records done
        self._generated = 0  # output tokens of every record, running ones included
        self._computed: int | None = None  # tokens the engine computed (None: not told)
        self._running: int | None = None  # sequences running (None: not told)
        self._batch = 1  # sequences running at the last step that ran some
        self._last: tuple[float, int, int | None] | None = None  # time, generated, computed
        self._first = 0.0
        self._first_computed: int | None = None

    def step(
        self,
        now: float,
        generated_tokens: int,
        running: int | None = None,
        computed_tokens: int | None = None,
    ) -> None:
        """After an engine step: the total output tokens generated so far, how many
        sequences are running, and the total tokens the engine computed."""
        self._generated = generated_tokens
        self._running = running
        self._computed = computed_tokens
        if running:
            self._batch = running
        if self._last is None:
            self._first, self._first_computed = now, computed_tokens
            self._last = (now, generated_tokens, computed_tokens)
            return
        then, before, computed_before = self._last
        dt = now - then
        if dt <= 0:
            return
        rate = (generated_tokens - before) / dt
        if self.rate is None:
            self.rate = rate
        else:
            self.rate += (1 - math.exp(-dt / RATE_TIME_CONSTANT)) * (rate - self.rate)
        if computed_tokens is not None and computed_before is not None:
            sampled = generated_tokens - before
            self.costs.add(dt, sampled, max(computed_tokens - computed_before - sampled, 0))
        self._last = (now, generated_tokens, computed_tokens)

    def record_done(self, output_tokens: int, failed: bool = False) -> None:
        """A record is done; a failed one (an error line, written before it generates)
        counts as done but not in the mean output per record."""
        self.records_done += 1
        if not failed:
            self.records_ran += 1
            self._finished_tokens += output_tokens

    @property
    def tokens_left(self) -> float:
        left = self.records - self.records_done
        done = self.records_ran
        mean = self._finished_tokens / done if done else self.prior
        running = max(self._generated - self._finished_tokens, 0)
        if self._running is None:
            return max(left * mean - running, 0.0)
        # Records that stop early (EOS) finish first, so the records done are the short
        # ones: a running record that has made `age` tokens is expected to end halfway
        # between that and the prior (an upper bound: max_tokens), at least one token on,
        # and the records not started as the done and running ones together.
        seqs = min(self._running, left)
        if seqs == 0:
            return left * mean
        age = running / seqs
        final = max(mean, (age + self.prior) / 2, age + 1)
        if done:
            mean = (self._finished_tokens + seqs * final) / (done + seqs)
        return (left - seqs) * mean + seqs * (final - age)

    @property
    def prompt_tokens_left(self) -> float:
        """Prompt tokens still to compute: the records not started x what a started record
        computed of its prompt, on average (0 while none has started)."""
        if self._computed is None or not self._running and not self.records_ran:
            return 0.0
        started = self.records_ran + (self._running or 0)
        to_run = self.records - (self.records_done - self.records_ran)
        computed = max(self._computed - self._generated, 0)  # prompts (and recomputed)
        return computed / started * max(to_run - started, 0)

    @property
    def scoring(self) -> bool:
        """Nothing is generated, as far as known (choices are scored): a rate of records,
        not of tokens, tells the job's pace."""
        return self.prior == 0 and self._generated == 0

    def seconds_left(self) -> float | None:
        if self.records_done >= self.records:
            return 0.0
        if not self.scoring:
            fitted = self._fitted_seconds_left()
            if fitted is None:
                fitted = self._token_seconds_left()
            if fitted is not None:
                return fitted
        if self.prior == 0 and self.records_done and self._last is not None:
            # Nothing is generated (choices are scored): the mean time per record so far.
            elapsed = self._last[0] - self._first
            return elapsed / self.records_done * (self.records - self.records_done)
        if not self.rate or self.rate <= 0:
            return None
        return self.tokens_left / self.rate

    def _token_seconds_left(self) -> float | None:
        """Before the step costs are fitted: every token left (prompt and output) at the
        mean seconds a computed token took since the first step."""
        if self._computed is None or self._first_computed is None or self._last is None:
            return None
        computed = self._computed - self._first_computed
        elapsed = self._last[0] - self._first
        if computed <= 0 or elapsed <= 0:
            return None
        return elapsed / computed * (self.tokens_left + self.prompt_tokens_left)

    def _fitted_seconds_left(self) -> float | None:
        """The work left at the fitted step costs: the output left in steps of the batch
        running now (at least as many as one more mean output), the prompts left a token."""
        costs = self.costs.fit()
        if costs is None:
            return None
        c0, c1, c2 = costs
        output = self.tokens_left
        batch = self._batch  # a wave of records just ended: the next starts as large
        steps = output / batch if output > 0 else 0.0
        seconds = steps * (c0 + c1 * batch) + c2 * self.prompt_tokens_left
        return seconds if math.isfinite(seconds) and seconds > 0 else None

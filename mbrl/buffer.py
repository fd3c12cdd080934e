"""Replay buffer of real (or imagined) steps: a ring of preallocated tensors that knows episodes.

Storage. Row ``i`` of the ring holds one step: ``obs``, ``act``, ``reward``, ``terminated``, its
episode id and its index within the episode. Observations are stored once: the next
observation of a row is the ``obs`` of the row after it when that row continues the same
episode, and the episode's final observation (kept once per episode in a small side store)
when the row is the last stored step of its episode. Images are kept as ``uint8``
(``obs_dtype``), so a pixel buffer costs one frame per step plus one per episode, not two per
step.

Episodes. :meth:`ReplayBuffer.add_episode` stores a whole :class:`~mbrl.data.Episode`.
:meth:`ReplayBuffer.add` and :meth:`ReplayBuffer.add_batch` stream steps in time order; a row
continues the episode of the row before it when that row neither terminated nor was truncated
and its ``next_obs`` equals this row's ``obs`` bit for bit (an env reset always gives a new
start, so learners that step one at a time need not say where episodes end; passing
``truncated`` makes it explicit).

Sampling. :meth:`ReplayBuffer.sample` draws i.i.d. rows uniformly with replacement
(``torch.randint(len, (B,), generator)``, the rows' physical positions);
:meth:`ReplayBuffer.sample_chunks` draws contiguous chunks of ``L`` steps that never cross an
episode boundary, returned as :class:`~mbrl.data.Sequences`.

Capacity counts steps (transitions). When full, the oldest steps are overwritten; an episode
whose first steps are gone keeps its remaining ones (with their original step indices), and its
final observation is dropped with its last step.

Shape letters follow DESIGN.md: ``B`` batch, ``L`` chunk length, ``X`` observation dim (or
``C, H, W`` for images), ``U`` action dim, ``T`` episode length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mbrl.data import Episode, Sequences, Transitions
from mbrl.shapes import check_shape

BUFFER_FORMAT = 3
"""Version of :meth:`ReplayBuffer.state_dict`. 2 is the episode-aware ring (no ``next_obs``);
3 writes copies of the stored rows, where 2 wrote slices that took the whole preallocated
ring into a checkpoint (``torch.save`` writes a slice's whole storage). Both are read."""

_READS = (2, 3)  # formats load_state_dict reads: the same fields

_MIN_FINALS = 16  # episode-final observations allocated at first; the side store grows by 2x


class ReplayBuffer:
    """Fixed-capacity FIFO store of steps grouped into episodes; the oldest are overwritten.

    Args:
        obs_shape: ``X`` (an int) for vector observations, or a shape such as ``(C, H, W)``.
        act_dim: ``U``.
        capacity: most steps (transitions) kept.
        device: where the storage (and every returned batch) lives.
        obs_dtype: dtype of the stored observations: ``torch.float32`` for vectors,
            ``torch.uint8`` for images (integer buffers refuse float observations, which would
            be rounded silently).
    """

    def __init__(
        self,
        obs_shape: int | Sequence[int],
        act_dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        obs_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(int(s) for s in obs_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"obs_shape must be X or a shape like (C, H, W), got {obs_shape!r}")
        if obs_dtype.is_complex or obs_dtype == torch.bool:
            raise ValueError(f"obs_dtype must be a real float or integer dtype, got {obs_dtype}")
        self.obs_shape: tuple[int, ...] = shape
        self.obs_dim: int | None = shape[0] if len(shape) == 1 else None  # X for vectors
        self.act_dim, self.capacity = act_dim, capacity
        self.obs_dtype = obs_dtype
        self.device = torch.device(device)
        dev = self.device
        f32 = {"dtype": torch.float32, "device": dev}
        self.obs = torch.zeros(capacity, *shape, dtype=obs_dtype, device=dev)  # [cap, X]
        self.act = torch.zeros(capacity, act_dim, **f32)  # [cap, U]
        self.reward = torch.zeros(capacity, **f32)  # [cap]
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=dev)  # [cap]
        self.truncated = torch.zeros(capacity, dtype=torch.bool, device=dev)  # [cap] last step
        self.last = torch.zeros(capacity, dtype=torch.bool, device=dev)  # [cap] next obs is final
        self.episode = torch.zeros(capacity, dtype=torch.long, device=dev)  # [cap] episode id
        self.step = torch.zeros(capacity, dtype=torch.long, device=dev)  # [cap] index in episode
        self.final_index = torch.zeros(capacity, dtype=torch.long, device=dev)  # [cap] into finals
        self._finals = torch.zeros(min(capacity, _MIN_FINALS), *shape, dtype=obs_dtype, device=dev)
        self._lo = 0  # first live final observation (the oldest stored episode's)
        self._hi = 0  # one past the newest
        self._next = 0  # row the next step goes to
        self._size = 0
        self._open = False  # the newest episode may be continued by the next streamed step
        self._episodes = 0  # id of the next new episode
        self._newest_step = 0  # step index of the newest stored row

    def __len__(self) -> int:
        return self._size

    @property
    def num_episodes(self) -> int:
        """Episodes with at least one stored step (the first may have lost its oldest steps)."""
        return self._hi - self._lo

    @property
    def obs_nbytes(self) -> int:
        """Bytes allocated for observations: one per stored step plus the episode finals."""
        return self.obs.nbytes + self._finals.nbytes

    # ------------------------------------------------------------------ adding

    def add(
        self,
        obs: torch.Tensor | np.ndarray,
        act: torch.Tensor | np.ndarray,
        reward: float,
        next_obs: torch.Tensor | np.ndarray,
        terminated: bool,
        truncated: bool = False,
    ) -> None:
        """Append one step (obs ``[X]``, act ``[U]``; images ``[C, H, W]``); the same rule as
        :meth:`add_batch` decides whether it continues the newest episode."""
        self._refuse_index(act, "act")
        obs, next_obs = self._as_obs(obs, "obs"), self._as_obs(next_obs, "next_obs")
        act = torch.as_tensor(
            act if torch.is_tensor(act) else np.asarray(act),
            dtype=torch.float32,
            device=self.device,
        )
        check_shape("obs", obs, self.obs_shape)
        check_shape("act", act, (self.act_dim,))
        check_shape("next_obs", next_obs, self.obs_shape)
        cap, row = self.capacity, self._next
        cont = self._open and bool(_same(self._finals[self._hi - 1][None], obs[None])[0])
        if cont:  # the newest stored row is no longer its episode's last
            prev = (row - 1) % cap
            self.last[prev] = False
            self.final_index[prev] = 0
            self._hi -= 1
            episode, step = self._episodes - 1, self._newest_step + 1
        else:
            episode, step = self._episodes, 0
            self._episodes += 1
        if self._size == cap and bool(self.last[row]):  # the oldest episode loses its final
            self._lo += 1
        self._reserve_finals(1)
        self._finals[self._hi] = next_obs
        self.final_index[row] = self._hi
        self._hi += 1
        self.obs[row], self.act[row], self.reward[row] = obs, act, float(reward)
        self.terminated[row], self.truncated[row] = bool(terminated), bool(truncated)
        self.last[row], self.episode[row], self.step[row] = True, episode, step
        self._newest_step = step
        self._next = (row + 1) % cap
        self._size = min(self._size + 1, cap)
        self._open = not (terminated or truncated)

    def add_batch(
        self,
        obs: torch.Tensor | np.ndarray,
        act: torch.Tensor | np.ndarray,
        reward: torch.Tensor | np.ndarray,
        next_obs: torch.Tensor | np.ndarray,
        terminated: torch.Tensor | np.ndarray,
        truncated: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Append ``B`` steps in time order: obs ``[B, X]``, act ``[B, U]``, reward ``[B]``,
        next_obs ``[B, X]``, terminated ``[B]``, truncated ``[B]`` (``None``: all False).

        Each row continues the episode of the row before it (for row 0: the newest stored
        one, unless that episode was closed) when that row neither terminated nor was
        truncated and its ``next_obs`` equals this row's ``obs``; otherwise it starts a new
        episode. Imagined transitions (independent rows) so become one-step episodes.
        """
        obs, next_obs = self._as_obs(obs, "obs"), self._as_obs(next_obs, "next_obs")
        self._refuse_index(act, "act")
        act, reward = (
            torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in (act, reward)
        )
        terminated = torch.as_tensor(terminated, dtype=torch.bool, device=self.device)
        b = obs.shape[0] if obs.ndim else 0
        truncated = (
            torch.zeros(b, dtype=torch.bool, device=self.device)
            if truncated is None
            else torch.as_tensor(truncated, dtype=torch.bool, device=self.device)
        )
        check_shape("obs", obs, (b, *self.obs_shape))
        check_shape("act", act, (b, self.act_dim))
        check_shape("reward", reward, (b,))
        check_shape("next_obs", next_obs, (b, *self.obs_shape))
        check_shape("terminated", terminated, (b,))
        check_shape("truncated", truncated, (b,))
        if b == 0:
            return
        ended = terminated | truncated  # [B]
        cont = torch.empty(b, dtype=torch.bool, device=self.device)  # [B] continues the row before
        cont[1:] = ~ended[:-1] & _same(next_obs[:-1], obs[1:])
        cont[0] = self._open and bool(_same(self._finals[self._hi - 1][None], obs[:1])[0])
        self._write_pieces(obs, act, reward, next_obs, terminated, truncated, cont)
        self._open = not bool(ended[-1])

    def add_episode(self, episode: Episode) -> None:
        """Append every step of a real episode as a new episode (``obs [T + 1, ...]``)."""
        t = len(episode)
        if t == 0:
            return
        obs = self._as_obs(episode.obs, "episode.obs")
        check_shape("episode.obs", obs, (t + 1, *self.obs_shape))
        self._refuse_index(episode.act, "episode.act")
        act = torch.as_tensor(episode.act, dtype=torch.float32, device=self.device)
        reward = torch.as_tensor(episode.reward, dtype=torch.float32, device=self.device)
        terminated = torch.as_tensor(episode.terminated, dtype=torch.bool, device=self.device)
        check_shape("episode.act", act, (t, self.act_dim))
        check_shape("episode.reward", reward, (t,))
        check_shape("episode.terminated", terminated, (t,))
        truncated = torch.zeros(t, dtype=torch.bool, device=self.device)
        truncated[-1] = bool(episode.truncated)
        cont = torch.ones(t, dtype=torch.bool, device=self.device)
        cont[0] = False
        self._write_pieces(obs[:-1], act, reward, obs[1:], terminated, truncated, cont)
        self._open = False

    def _write_pieces(self, obs, act, reward, next_obs, terminated, truncated, cont) -> None:
        # more rows than the capacity: write them ``capacity`` at a time, oldest first, so the
        # newest ``capacity`` remain with their episode ids and step indices
        for lo in range(0, obs.shape[0], self.capacity):
            hi = lo + self.capacity
            self._write(
                obs[lo:hi], act[lo:hi], reward[lo:hi], next_obs[lo:hi],
                terminated[lo:hi], truncated[lo:hi], cont[lo:hi],
            )  # fmt: skip

    def _write(self, obs, act, reward, next_obs, terminated, truncated, cont) -> None:
        """Write ``b <= capacity`` rows; ``cont [b]`` says which continue the row before."""
        b, cap, dev = obs.shape[0], self.capacity, self.device
        idx = torch.arange(b, device=dev)
        continues_stored = bool(cont[0])
        prev_step = 0
        if continues_stored:  # the newest stored row is no longer its episode's last
            prev = (self._next - 1) % cap
            prev_step = self._newest_step
            self.last[prev] = False
            self.final_index[prev] = 0
            self._hi -= 1
        new = ~cont  # [b] rows that start an episode
        episode = self._episodes - 1 + torch.cumsum(new.long(), 0)  # [b]
        start = torch.cummax(torch.where(new, idx, torch.full_like(idx, -1)), 0).values  # [b]
        step = torch.where(start >= 0, idx - start, prev_step + 1 + idx)  # [b]
        last = torch.ones(b, dtype=torch.bool, device=dev)  # [b] next obs is a final
        last[:-1] = ~cont[1:]

        rows = (self._next + idx) % cap  # [b]
        overwritten = max(0, self._size + b - cap)  # oldest stored rows about to be replaced
        if overwritten:
            self._lo += int(self.last[rows[b - overwritten :]].sum())
        k = int(last.sum())
        self._reserve_finals(k)
        self._finals[self._hi : self._hi + k] = next_obs[last]
        final_index = torch.zeros(b, dtype=torch.long, device=dev)
        final_index[last] = self._hi + torch.arange(k, device=dev)
        self._hi += k

        self.obs[rows], self.act[rows], self.reward[rows] = obs, act, reward
        self.terminated[rows], self.truncated[rows], self.last[rows] = terminated, truncated, last
        self.episode[rows], self.step[rows], self.final_index[rows] = episode, step, final_index
        self._episodes += int(new.sum())
        self._newest_step = int(step[-1])
        self._next = (self._next + b) % cap
        self._size = min(self._size + b, cap)

    def _reserve_finals(self, k: int) -> None:
        """Make room for ``k`` more final observations (compacting, growing by 2x as needed)."""
        if self._hi + k <= self._finals.shape[0]:
            return
        live = self._hi - self._lo
        need = live + k  # at most the capacity: one final per stored episode
        size = max(need, min(self.capacity, max(_MIN_FINALS, 2 * need)))
        finals = torch.zeros(size, *self.obs_shape, dtype=self.obs_dtype, device=self.device)
        finals[:live] = self._finals[self._lo : self._hi]
        self.final_index.sub_(self._lo).clamp_(min=0)  # rows that are not last keep 0
        self._finals, self._lo, self._hi = finals, 0, live

    def _as_obs(self, value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        if t.dtype.is_floating_point and not self.obs_dtype.is_floating_point:
            raise TypeError(
                f"{name}: this buffer stores {self.obs_dtype} observations (images); got "
                f"{t.dtype}. Pass the raw {self.obs_dtype} frames, or build the buffer with "
                f"obs_dtype={t.dtype} for float observations"
            )
        return t.to(device=self.device, dtype=self.obs_dtype)

    def _refuse_index(self, act: object, name: str) -> None:
        a = act if torch.is_tensor(act) else np.asarray(act)
        is_int = not a.dtype.is_floating_point if torch.is_tensor(a) else a.dtype.kind in "iub"
        if is_int:
            raise TypeError(
                f"{name}: the buffer stores action vectors [U={self.act_dim}], got integers "
                f"{list(a.shape)} (discrete action indices?): store the action vector of each "
                "index, EnvSpec.action_vector(index)"
            )

    # ------------------------------------------------------------------ reading

    def all(self) -> Transitions:
        """Every stored step as a transition, oldest first."""
        return self._gather(self._logical_rows())

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Transitions:
        """``batch_size`` transitions drawn uniformly with replacement.

        Draws ``torch.randint(len(self), (batch_size,), generator)`` on the generator's device
        and takes those physical rows (once full, every row is stored).
        """
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer; add transitions first")
        dev = generator.device if generator is not None else "cpu"
        rows = torch.randint(self._size, (batch_size,), generator=generator, device=dev)
        return self._gather(rows.to(self.device))

    def sample_chunks(
        self, batch_size: int, length: int, generator: torch.Generator | None = None
    ) -> Sequences:
        """``batch_size`` chunks of ``L = length`` contiguous steps of one episode each.

        The first step of a chunk is drawn uniformly (with replacement) among the stored steps
        that have ``L - 1`` more steps of the same episode after them; chunks never cross an
        episode boundary. Returns :class:`~mbrl.data.Sequences` with ``obs [B, L + 1, ...]``.

        Raises:
            ValueError: an empty buffer, ``length < 1``, or no stored episode with ``L`` steps
                (the message gives the longest stored one).
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"chunk length must be an int >= 1, got {length!r}")
        if self._size == 0:
            raise ValueError("cannot sample chunks from an empty replay buffer; add episodes first")
        logical = self._logical_rows()  # [n] oldest first
        episode = self.episode[logical]  # [n]
        valid = (
            episode[: self._size - length + 1] == episode[length - 1 :]
            if length <= self._size
            else episode[:0].bool()
        )  # [n - L + 1] the chunk starting here stays in one episode
        starts = torch.nonzero(valid).squeeze(1)  # [S]
        if starts.numel() == 0:
            longest = int(torch.unique_consecutive(episode, return_counts=True)[1].max())
            raise ValueError(
                f"sample_chunks: no stored episode has the requested length L={length}; the "
                f"longest stored episode has {longest} steps. Ask for L <= {longest} or collect "
                "longer episodes first"
            )
        dev = generator.device if generator is not None else "cpu"
        pick = torch.randint(starts.numel(), (batch_size,), generator=generator, device=dev)
        first = starts[pick.to(self.device)]  # [B] logical index of each chunk's first step
        rows = logical[first[:, None] + torch.arange(length, device=self.device)]  # [B, L]
        final = self._next_obs(rows[:, -1])  # [B, ...]
        return Sequences(
            obs=torch.cat([self.obs[rows], final[:, None]], dim=1),
            act=self.act[rows],
            reward=self.reward[rows],
            terminated=self.terminated[rows],
            time=self.step[rows],
        )

    def episodes(self) -> list[Episode]:
        """The stored episodes, oldest first, as numpy :class:`~mbrl.data.Episode` records
        (``seconds`` is not stored: NaN). The oldest may have lost its first steps."""
        if self._size == 0:
            return []
        logical = self._logical_rows()
        counts = torch.unique_consecutive(self.episode[logical], return_counts=True)[1]
        out = []
        for rows in torch.split(logical, counts.tolist()):
            final = self._next_obs(rows[-1:])
            out.append(
                Episode(
                    obs=torch.cat([self.obs[rows], final]).cpu().numpy(),
                    act=self.act[rows].cpu().numpy(),
                    reward=self.reward[rows].cpu().numpy(),
                    terminated=self.terminated[rows].cpu().numpy(),
                    truncated=bool(self.truncated[rows[-1]]),
                    seconds=math.nan,
                )
            )
        return out

    def _logical_rows(self) -> torch.Tensor:
        """Physical rows of the stored steps, oldest first: ``[n]``."""
        idx = torch.arange(self._size, device=self.device)
        return (self._next - self._size + idx) % self.capacity

    def _next_obs(self, rows: torch.Tensor) -> torch.Tensor:
        """Next observation of each of ``rows [...]``: ``[..., *obs_shape]``."""
        following = self.obs[(rows + 1) % self.capacity]
        final = self._finals[self.final_index[rows]]
        last = self.last[rows].reshape(*rows.shape, *([1] * len(self.obs_shape)))
        return torch.where(last, final, following)

    def _gather(self, rows: torch.Tensor) -> Transitions:
        return Transitions(
            obs=self.obs[rows],
            act=self.act[rows],
            next_obs=self._next_obs(rows),
            reward=self.reward[rows],
            terminated=self.terminated[rows],
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The stored rows, the episode finals and the cursor; tensors and ints only (safe for
        ``weights_only`` loads), with ``version`` :data:`BUFFER_FORMAT`.

        The tensors are copies of the first ``len(self)`` physical rows (``[n, ...]``), not
        views of the preallocated ring, so a checkpoint grows with the data, not the capacity.
        """
        n = self._size
        last = self.last[:n]

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        return {
            "version": BUFFER_FORMAT,
            "capacity": self.capacity,
            "size": n,
            "next": self._next,
            "open": int(self._open),
            "episodes": self._episodes,
            "obs": rows(self.obs[:n]),
            "act": rows(self.act[:n]),
            "reward": rows(self.reward[:n]),
            "terminated": rows(self.terminated[:n]),
            "truncated": rows(self.truncated[:n]),
            "last": rows(last),
            "episode": rows(self.episode[:n]),
            "step": rows(self.step[:n]),
            "final_index": rows(torch.where(last, self.final_index[:n] - self._lo, 0)),
            "finals": rows(self._finals[self._lo : self._hi]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a buffer with the same capacity and observations.

        Raises:
            ValueError: a checkpoint of the oldest buffer format (``next_obs`` per row, no
                episodes), a format other than 2 or 3, another capacity or observation shape.
        """
        if "version" not in state:
            if "next_obs" in state:
                raise ValueError(
                    "this replay-buffer checkpoint comes from an older version of the buffer "
                    f"(format 1: a next_obs copy per row, no episode boundaries); this version "
                    f"reads format {' or '.join(map(str, _READS))} only and cannot recover the "
                    "episodes it lacks. Start a new run (a new run folder) with this version"
                )
            raise ValueError(
                f"not a replay-buffer state: keys {sorted(state)}, expected format "
                f"{BUFFER_FORMAT} with a 'version' key"
            )
        if state["version"] not in _READS:
            raise ValueError(
                f"replay-buffer checkpoint has format {state['version']}, this version reads "
                f"format {' or '.join(map(str, _READS))}; start a new run with this version"
            )
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"buffer capacity mismatch: checkpoint has {state['capacity']}, "
                f"this buffer {self.capacity}"
            )
        obs = state["obs"]
        if tuple(obs.shape[1:]) != self.obs_shape or obs.dtype != self.obs_dtype:
            raise ValueError(
                f"buffer observations mismatch: checkpoint has {list(obs.shape[1:])} "
                f"{obs.dtype}, this buffer {list(self.obs_shape)} {self.obs_dtype}"
            )
        n = int(state["size"])
        for name in (
            "obs", "act", "reward", "terminated", "truncated", "last", "episode", "step",
            "final_index",
        ):  # fmt: skip
            getattr(self, name)[:n] = state[name].to(self.device)
        finals = state["finals"].to(self.device)
        live = finals.shape[0]
        self._finals = torch.zeros(
            max(live, min(self.capacity, _MIN_FINALS)),
            *self.obs_shape,
            dtype=self.obs_dtype,
            device=self.device,
        )
        self._finals[:live] = finals
        self._lo, self._hi = 0, live
        self._next, self._size = int(state["next"]), n
        self._open, self._episodes = bool(state["open"]), int(state["episodes"])
        self._newest_step = int(self.step[(self._next - 1) % self.capacity]) if n else 0


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise bit-for-bit equality of ``a [B, ...]`` and ``b [B, ...]``: ``bool [B]``."""
    n, d = a.shape[0], math.prod(a.shape[1:])
    return (
        a.contiguous().reshape(n, d).view(torch.uint8)
        == b.contiguous().reshape(n, d).view(torch.uint8)
    ).all(dim=1)

"""Child process for test_sigkill.py: learns episodes into a StateDir until it is killed.

Usage: python crash_child.py STATE_DIR SEED BALLAST_BYTES

Protocol on stdout (one line each, flushed):
  ready <n>            recovered n episodes, starting to learn
  ack <seq> <episode>  the episode's record is durable (`log` returned)
  ckpt-begin <n>       a checkpoint of n episodes starts
  ckpt-end <n>         ... and finished (CURRENT switched, log rotated)

Episode k's content is `vector(k)`, so the parent can check every byte without
talking to the child. Each checkpoint holds all episodes so far, an extra file that must
agree with them (stands in for the hnswlib index) and a ballast array so that checkpoints
take long enough for kills to land inside them.
"""

import sys

import numpy as np

from agent.persist import Recovery, StateDir, decode_record, encode_record

DIM = 32


def vector(episode: int) -> np.ndarray:
    return np.random.default_rng(episode).standard_normal(DIM).astype(np.float32)  # (DIM,)


def rebuild(rec: Recovery) -> tuple[list[int], list[int], list[np.ndarray]]:
    """(episode ids, their seqs, their vectors) = checkpoint + replayed records."""
    ids: list[int] = []
    seqs: list[int] = []
    xs: list[np.ndarray] = []
    ck = rec.checkpoint
    if ck is not None:
        x = ck.arrays["x"]  # (N, DIM)
        if ck.files["index.bin"].read_bytes() != x.tobytes():
            raise AssertionError(f"{ck.path}: index.bin disagrees with x.npy")
        if ck.info["n"] != len(x) or ck.wal_seq != int(ck.arrays["seqs"][-1]):
            raise AssertionError(f"{ck.path}: info/wal_seq disagree with the arrays")
        ids, seqs, xs = ck.arrays["ids"].tolist(), ck.arrays["seqs"].tolist(), list(x)
    for seq, payload in rec.records:
        meta, arrays = decode_record(payload)
        ids.append(meta["episode"])
        seqs.append(seq)
        xs.append(arrays["x"])
    return ids, seqs, xs


def main(root: str, seed: int, ballast_bytes: int) -> None:
    rng = np.random.default_rng(seed)
    with StateDir(root) as state:
        ids, seqs, xs = rebuild(state.recover())
        print(f"ready {len(ids)}", flush=True)
        every = int(rng.integers(2, 9))
        while True:
            episode = len(ids) + 1
            x = vector(episode)
            seq = state.log(encode_record({"episode": episode}, {"x": x}), durable=True)
            ids.append(episode)
            seqs.append(seq)
            xs.append(x)
            print(f"ack {seq} {episode}", flush=True)
            if len(ids) % every == 0:
                n = len(ids)
                print(f"ckpt-begin {n}", flush=True)
                x_all = np.stack(xs)  # (n, DIM)
                state.checkpoint(
                    {"ids": np.array(ids, np.int64), "seqs": np.array(seqs, np.int64),
                     "x": x_all, "ballast": np.full(ballast_bytes, n % 251, np.uint8)},
                    {"index.bin": lambda p, x_all=x_all: p.write_bytes(x_all.tobytes())},
                    {"n": n})
                print(f"ckpt-end {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

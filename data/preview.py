"""``--show-samples N``: encoded samples as text with the trained spans marked.

Token ``i`` is trained when the label of position ``i-1`` is token ``i``; trained runs are
wrapped in ``«…»`` (and shown green on a terminal).  Where a label differs from the next
input token (baichuan2 learns EOS where the next user turn starts; a cut answer learns its
stop token) the target is shown as ``«→TOKEN»``.
"""
from __future__ import annotations

import numpy as np

from .samples import SAMPLE_TYPES

OPEN, CLOSE = "«", "»"
GREEN, RESET = "\033[32m", "\033[0m"


def mark_trained(tok, ids, labels, color: bool = False) -> str:
    ids = [int(x) for x in ids]
    labels = [int(x) for x in labels]
    flags = [False] + [labels[i - 1] == ids[i] for i in range(1, len(ids))]
    out, run, run_flag = [], [], None

    def flush():
        if run:
            text = tok.decode(run)
            out.append((GREEN + text + RESET if color else OPEN + text + CLOSE) if run_flag else text)

    for i, (t, f) in enumerate(zip(ids, flags)):
        if f != run_flag:
            flush()
            run, run_flag = [], f
        run.append(t)
        nxt = ids[i + 1] if i + 1 < len(ids) else None
        if labels[i] != -100 and labels[i] != nxt:
            flush()
            run = []
            out.append(f"{OPEN}→{tok.decode([labels[i]])}{CLOSE}")
    flush()
    return "".join(out)


def show_samples(rows, tok, n: int, color: bool = False) -> str:
    """The first ``n`` documents in file order, one block each."""
    blocks = []
    for s in rows.sources:
        for d in range(len(s.lengths)):
            if len(blocks) >= n:
                return "\n".join(blocks)
            ids, labels = s.doc(d)
            trained = int((np.asarray(labels) != -100).sum())
            head = (f"== sample {len(blocks) + 1}: {s.path}:{int(s.lines[d])} ({SAMPLE_TYPES[int(s.kinds[d])]}), "
                    f"{len(ids)} tokens, {trained} trained")
            blocks.append(f"{head}\n{mark_trained(tok, ids, labels, color)}\n")
    return "\n".join(blocks)

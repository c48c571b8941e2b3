"""Calibrated quantization on all-MiniLM-L6-v2 with its real weights (``examples/minilm.py``).

    python -m bench.calibrate_minilm [table | defaults | budget | rotate | rotate-budget]

Calibrates on CALIBRATION sentences, evaluates on EVALUATION sentences (disjoint, written for this
benchmark), and prints the mean and smallest cosine between each quantized model's embeddings and
the float model's, with the average bits per weight over the 36 encoder matrices (scales counted)
and the calibration time; the ``rotate`` modes add the mean cosine on ``minilm.SENTENCES`` and on
OTHER (16 more sentences, in neither set). Embeddings are computed with ``jax.jit`` on the dequantized weights (the
reference decoder; the fused kernels match it, see tests/test_calibrate.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fusec import lowprec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

CALIBRATION = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "She spent the afternoon reading a novel about a detective in Victorian London.",
    "How do I reset my password if I no longer have access to my email account?",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Scientists discovered a new species of frog in the rainforests of Madagascar.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The software update fixes several security vulnerabilities and improves battery life.",
    "Climate change is causing glaciers to melt faster than predicted.",
    "He played the violin at the wedding, and everyone cried.",
    "Please send me the quarterly report by Friday afternoon.",
    "The museum's new exhibition features paintings from the Dutch golden age.",
    "Electric cars are becoming cheaper as battery prices continue to drop.",
    "A strong earthquake shook the coastal city early this morning.",
    "The children built a sandcastle while their parents watched from the shade.",
    "Regular exercise and a balanced diet reduce the risk of heart disease.",
    "The train to Berlin was delayed by two hours because of a signal failure.",
    "Machine translation has improved dramatically over the last decade.",
    "The old lighthouse has guided ships safely into the harbour for a century.",
    "My grandmother grows tomatoes, beans and zucchini in her garden.",
    "The committee will vote on the new budget proposal next week.",
    "Astronomers observed a supernova in a galaxy millions of light years away.",
    "This laptop overheats whenever I run more than two programs at once.",
    "The hikers reached the summit just before the storm rolled in.",
    "Coffee prices have risen because of poor harvests in Brazil.",
    "The startup raised fifty million dollars to build delivery robots.",
    "Jazz musicians often improvise long solos during live performances.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "The city plans to add more bike lanes and pedestrian zones downtown.",
    "An ancient manuscript was found hidden inside the walls of the monastery.",
    "What is the best way to learn a new programming language quickly?",
    "The referee's decision sparked angry protests from the home fans.",
)
EVALUATION = (
    "A man is playing a guitar on the street corner.",
    "The weather forecast predicts heavy rain for the weekend.",
    "Two dogs are chasing a ball across the park.",
    "The government announced new measures to support small businesses.",
    "She ordered a pizza with mushrooms and extra cheese.",
    "The spacecraft landed safely on the surface of Mars.",
    "Students are preparing for their final exams in the library.",
    "The company reported record profits in the last quarter.",
    "A woman is slicing vegetables in the kitchen.",
    "The river flooded several villages after days of rain.",
    "He forgot his umbrella and got soaked on the way home.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Can you recommend a good book about the history of Rome?",
    "The new bridge will cut travel time between the two cities in half.",
    "A cat is sleeping on the windowsill in the sun.",
    "Doctors warn that the flu season could be severe this year.",
)

OTHER = (
    "The children laughed as the clown juggled five oranges.",
    "Interest in electric bicycles has grown quickly in European cities.",
    "A heavy fog delayed dozens of flights at the airport this morning.",
    "The painter mixed blue and yellow to get the right shade of green.",
    "Is it safe to drink tap water in this part of the country?",
    "The farmer harvested the wheat before the autumn rains arrived.",
    "Our neighbours adopted a puppy from the local animal shelter.",
    "The professor explained the theory of relativity with a simple drawing.",
    "Thousands of fans queued overnight to buy tickets for the concert.",
    "The bakery on the corner sells the best croissants in town.",
    "A small boat capsized near the island, but everyone was rescued.",
    "The new phone has a larger screen and a faster processor.",
    "Volunteers planted five hundred trees along the river.",
    "The chess champion resigned after a surprising blunder in the endgame.",
    "My flight was cancelled, so I spent the night at the airport hotel.",
    "The documentary follows a family of elephants across the savanna.",
)


def batches(sentences: tuple[str, ...], size: int = 8) -> list[tuple[jax.Array, jax.Array]]:
    import minilm

    return [minilm.tokenize(sentences[i:i + size]) for i in range(0, len(sentences), size)]


def cosines(encode, params, qparams, ids, mask) -> tuple[float, float]:
    ref = jax.jit(encode)(params, ids, mask)
    emb = jax.jit(encode)(lowprec.dequantize(qparams), ids, mask)
    c = np.asarray(jnp.sum(emb * ref, -1))
    return float(c.mean()), float(c.min())


def main() -> None:
    import minilm

    params = minilm.load_params()
    cal = batches(CALIBRATION)
    ids, mask = minilm.tokenize(EVALUATION)
    rows = []

    def run(label: str, **kw) -> None:
        t = time.perf_counter()
        q, rep = lowprec.calibrate(minilm.encode, params, cal, with_report=True, **kw)
        seconds = time.perf_counter() - t
        mean, least = cosines(minilm.encode, params, q, ids, mask)
        rows.append((label, rep.bits_per_weight, mean, least, seconds))
        print(f"{label:34s} {rep.bits_per_weight:6.3f} {mean:8.5f} {least:8.5f} {seconds:7.1f}", flush=True)

    v1 = dict(act_order=False, damp=0.01)  # the first version's defaults, for the older rows
    modes = set(sys.argv[1:]) or {"table", "defaults", "budget"}
    if modes & {"table", "defaults", "budget"}:
        print(f"{'method':34s} {'bpw':>6s} {'mean cos':>8s} {'min cos':>8s} {'seconds':>7s}")
    if "table" in modes:
        for b in (8, 6, 5, 4, 3):
            run(f"rtn int{b} g128", bits=b, method="rtn", search=False)
            run(f"gptq+search d.01 int{b} g128", bits=b, **v1)
        for b in (4, 3):
            run(f"rtn+search int{b} g128", bits=b, method="rtn")
            run(f"gptq d.01 int{b} g128", bits=b, search=False, **v1)
            run(f"gptq+search+act d.01 int{b} g128", bits=b, act_order=True, damp=0.01)
            run(f"gptq+search d.01 nf{b} g128", bits=b, fmt="nf", **v1)
            run(f"gptq+search d.01 lut{b} g128 (learned)", bits=b, fmt="lut", **v1)
    if "defaults" in modes:
        for b in (4, 3):  # the defaults: act-order, damping 0.1
            run(f"gptq+search+act int{b} g128", bits=b)
            run(f"gptq+search+act nf{b} g128", bits=b, fmt="nf")
            run(f"gptq+search+act lut{b} g128 (learned)", bits=b, fmt="lut")
    if modes & {"rotate", "rotate-budget"}:
        rotate_rows(minilm, params, cal, modes)
    if "budget" in modes:
        run("gptq+search+act nf budget 4.25 g128", budget=4.25, fmt="nf", widths=(3, 4, 5, 6))
        run("gptq+search+act nf budget 3.25 g128", budget=3.25, fmt="nf", widths=(2, 3, 4, 5))
        run("gptq+search+act lut budget 4.25 g128", budget=4.25, fmt="lut", widths=(3, 4, 5, 6))
        run("gptq+search+act lut budget 3.25 g128", budget=3.25, fmt="lut", widths=(2, 3, 4, 5))


VARIANTS = (("", {}), ("+rot", dict(rotate="hadamard")), ("+awq", dict(awq=True)),
            ("+rot+awq", dict(rotate="hadamard", awq=True)))


def rotate_rows(minilm, params, cal, modes: set[str]) -> None:
    """Rotations (block 128) and AWQ against plain RTN and GPTQ, on three sentence sets."""
    sets = [minilm.tokenize(s) for s in (EVALUATION, minilm.SENTENCES, OTHER)]
    print(f"{'method':40s} {'bpw':>6s} {'eval':>8s} {'min':>8s} {'SENT.':>8s} {'other':>8s} {'seconds':>7s}")

    def run(label: str, **kw) -> None:
        t = time.perf_counter()
        q, rep = lowprec.calibrate(minilm.encode, params, cal, with_report=True, **kw)
        seconds = time.perf_counter() - t
        (mean, least), (sent, _), (other, _) = (cosines(minilm.encode, params, q, *s) for s in sets)
        print(f"{label:40s} {rep.bits_per_weight:6.3f} {mean:8.5f} {least:8.5f} {sent:8.5f} {other:8.5f} "
              f"{seconds:7.1f}", flush=True)

    if "rotate" in modes:
        for fmt in ("int", "nf"):
            for b in (4, 3):
                for name, kw in VARIANTS:
                    run(f"rtn{name} {fmt}{b} g128", bits=b, fmt=fmt, method="rtn", search=False, **kw)
                    run(f"gptq+search+act{name} {fmt}{b} g128", bits=b, fmt=fmt, **kw)
    if "rotate-budget" in modes:  # the rotation first: budgets are slow (every width of every matrix)
        budgets = (("nf", 4.25, (3, 4, 5, 6)), ("lut", 3.25, (2, 3, 4, 5)))
        order = [(v, b) for v in (1, 0, 3, 2) for b in budgets if (v, b[0]) != (0, "nf")] + [(0, budgets[0])]
        for v, (fmt, budget, widths) in order:
            name, kw = VARIANTS[v]
            run(f"gptq+search+act{name} {fmt} budget {budget}", budget=budget, fmt=fmt, widths=widths, **kw)


if __name__ == "__main__":
    main()

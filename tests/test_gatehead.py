"""The head the release gate judges with (edgecl.gatehead): LDA when every class's scatter is known under
both backbones, ncm otherwise (and why), and a device's scatter cannot poison what the gate publishes.
Hand-made embeddings and real statistics deltas; the whole round runs in tests/test_fleet_e2e.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecl import gatehead
from edgecl.formats import delta as D
from edgecl.formats import scatter as sc
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import restrict
from edgecl.release import CALIBRATION, verdict

DIM = 16
KNOWN = ["bolt", "nut"]
OWN = ["gear"]


def _class(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    # elongated along dimension 0: the classes differ along dimension 1, where the spread is small
    return centre + rng.normal(size=(n, DIM)) * np.r_[4.0, np.full(DIM - 1, 0.3)]


def _data(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = {c: np.eye(DIM)[1] * 1.5 * i for i, c in enumerate(KNOWN + OWN)}
    return {c: _class(rng, centres[c], 60) for c in KNOWN + OWN}, rng.normal(size=DIM)


def _piece(train: dict[str, np.ndarray], classes: list[str]) -> gatehead.Piece:
    x = np.concatenate([train[c] for c in classes])
    y = np.repeat(np.arange(len(classes)), [len(train[c]) for c in classes])
    return list(classes), sc.class_scatter(x, y)


def _answer(train: dict[str, np.ndarray], scatter: sc.Scatter | None) -> D.Delta:
    table = Prototypes(OWN, np.stack([train[c].mean(0) for c in OWN]).astype(np.float32), np.asarray([60]))
    return D.Delta(bundle_id="b", bundle_version=2, base_sha256="0" * 64, mask_sha256="f" * 64, device_id="line-a",
                   delta_k=4, positions=np.zeros(0, np.int32), values=np.zeros(0, np.float32), prototypes=table,
                   scatter=scatter, base_scatter=scatter)


def _table(train: dict[str, np.ndarray], classes: list[str]) -> Prototypes:
    return Prototypes(classes, np.stack([train[c].mean(0) for c in classes]).astype(np.float32),
                      np.full(len(classes), 60))


def _judge(head: gatehead.GateHead, train: dict[str, np.ndarray], test: dict[str, np.ndarray]):
    """The gate's four scores on one backbone (both the same here: what differs is the head)."""
    emb = np.concatenate([test[c] for c in KNOWN + OWN])
    truth = [c for c in KNOWN + OWN for _ in range(len(test[c]))]
    candidate = _table(train, KNOWN + OWN)
    evals = {"candidate": head.score("candidate", emb, truth, candidate),
             "restricted": head.score("candidate", emb, truth, restrict(candidate, KNOWN)),
             "baseline": head.score("baseline", emb, truth, candidate),
             "current": head.score("current", emb, truth, _table(train, KNOWN))}
    groups = {CALIBRATION: KNOWN, "device:line-a": OWN}
    return verdict(groups, evals["candidate"], evals["baseline"], evals["current"], 0.0,
                   restricted=evals["restricted"])


def test_lda_when_every_scatter_is_known_and_it_beats_ncm_on_correlated_classes(tmp_path: Path):
    train, _ = _data(0)
    test, _ = _data(1)
    host = {role: _piece(train, KNOWN) for role in ("current", "candidate")}
    answer = _answer(train, sc.Scatter.of(np.concatenate([train[c] for c in OWN]), np.zeros(60), rank=8))
    head = gatehead.choose(_table(train, KNOWN + OWN), KNOWN, {"line-a": answer}, host, tmp_path)
    assert head.name == "lda", head.why
    assert head.shipped is not None and head.shipped_classes == sorted(KNOWN + OWN)
    table, reasons = _judge(head, train, test)
    ncm_table, _ = _judge(gatehead.NCM, train, test)
    assert reasons == []
    # the classes differ where the spread is small: the covariance sees it, cosine prototypes do not
    assert table[CALIBRATION]["candidate"] > ncm_table[CALIBRATION]["candidate"] + 0.1


def test_ncm_and_why_when_a_scatter_is_missing(tmp_path: Path):
    train, _ = _data(0)
    host = {role: _piece(train, KNOWN) for role in ("current", "candidate")}
    table = _table(train, KNOWN + OWN)
    old_edgecl = gatehead.choose(table, KNOWN, {"line-a": _answer(train, None)}, host, tmp_path)
    assert old_edgecl.name == "ncm" and "line-a sent no scatter" in old_edgecl.why
    no_class_data = gatehead.choose(table, KNOWN, {"line-a": _answer(train, None)}, None, tmp_path)
    assert no_class_data.name == "ncm" and "--class-data" in no_class_data.why
    silent = gatehead.choose(table, KNOWN, {}, host, tmp_path)               # line-a did not answer
    assert silent.name == "ncm" and "no scatter of gear" in silent.why


def test_a_poisoned_scatter_is_refused_by_the_same_classes_comparison(tmp_path: Path):
    """A device sends, for its one class, a scatter that swamps the pooled covariance along the direction
    the current classes are told apart by (1e6 x). The candidate is served with the pooled covariance,
    so the current classes, scored among themselves with it, fall below the current version: refused."""
    train, _ = _data(0)
    test, _ = _data(1)
    host = {role: _piece(train, KNOWN) for role in ("current", "candidate")}
    poison = sc.Scatter((np.eye(DIM)[:, [1]] * 3e4).astype(np.float32), 0.0, 60, 1)   # 9e8 along dimension 1
    head = gatehead.choose(_table(train, KNOWN + OWN), KNOWN, {"line-a": _answer(train, poison)}, host, tmp_path)
    assert head.name == "lda"
    _, reasons = _judge(head, train, test)
    assert any(r.startswith("calibration: candidate on the current classes") for r in reasons), reasons


def test_a_current_class_the_class_data_lacks_takes_its_scatter_from_the_versions_exemplars(tmp_path: Path):
    """A round after a release: the current version knows gear (a device added it in round 1; mode 2
    ships its exemplars), the host's class data only bolt and nut. The exemplars' scatter completes the
    current classes under both backbones, so the gate judges with LDA instead of falling back to ncm."""
    train, _ = _data(0)
    known = KNOWN + OWN                                  # gear is a current class now
    host = {role: _piece(train, KNOWN) for role in ("current", "candidate")}
    exemplars = np.concatenate([train[c][:20] for c in known])
    labels = np.repeat(np.arange(len(known)), 20)
    table = _table(train, known)
    assert gatehead.choose(table, known, {}, host, tmp_path).why == "no scatter of the current version's gear " \
        "(neither --class-data nor a scatter the version ships)"
    filled = gatehead.exemplar_pieces(host, known, known, labels, {"current": exemplars, "candidate": exemplars})
    assert filled is not None and filled["candidate"][0] == [*KNOWN, "gear"]
    dense, count, groups = filled["candidate"][1]                           # type: ignore[misc]
    alone = sc.class_scatter(train["gear"][:20], np.zeros(20))
    np.testing.assert_allclose(dense, host["candidate"][1][0] + alone[0])   # type: ignore[index]
    assert (count, groups) == (120 + 20, 3)
    head = gatehead.choose(table, known, {}, filled, tmp_path)
    assert head.name == "lda" and head.shipped_classes == sorted(known), head.why
    # a class neither the class data nor the exemplars hold stays missing: ncm, and why
    partial = gatehead.exemplar_pieces(host, known, KNOWN, labels[:40], {"current": exemplars[:40],
                                                                         "candidate": exemplars[:40]})
    assert partial is host and gatehead.choose(table, known, {}, partial, tmp_path).name == "ncm"

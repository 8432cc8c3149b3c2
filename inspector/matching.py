"""Our default mode: view-invariant feature matching with alignment-verified re-ranking (DESIGN §3).

:class:`MemorizationScorer` is a scikit-learn-style estimator. ``fit`` whitens the training features
per layer with a shrunk covariance (:class:`inspector.scores.Whitener`); ``score_samples`` takes the
features of every *view* of the query slices (by default the eight orientations of :mod:`inspector.views`),
shortlists the training slices nearest over all views, adds the nearest under the moment-normalised structure
descriptor (:mod:`inspector.descriptors`, which keeps separating look-alike subjects of one protocol where an
invariance-trained encoder does not), registers every candidate coarsely under every orientation and the best
``verify_top`` in full onto the query with a similarity transform (:func:`inspector.align.register_pairs`), and
scores it by correlation over the aligned overlap. Higher ``similarity`` means *more memorised*. The null is
scored through exactly this path, views included, so the calibration holds whatever the view set.

The feature similarity of a (query, training) pair is the mean over layers of the whitened cosine
similarities: every layer's whitened, L2-normalised vector is scaled by ``1/sqrt(L)`` and the layers
are concatenated, so one inner-product search gives that mean exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .align import Alignment, register_pairs
from .descriptors import DESCRIPTOR_ZOOM_SIZES, DESCRIPTOR_ZOOMS, rotation_descriptor, structure_descriptor
from .index import NeighbourIndex
from .scores import PaperScorer, Whitener
from .store import release_pages
from .types import ProgressFn
from .views import FLIPS, View, parse_view, training_to_query

__all__ = ["InsufficientDataError", "MatchResult", "Matcher", "MemorizationScorer", "PaperMatcher"]

log = logging.getLogger(__name__)


class InsufficientDataError(ValueError):
    """The inputs are too small or too uniform for the requested audit."""


#: Pairs whose images are gathered and registered at once by :func:`register_blocks`: a multiple of
#: :func:`inspector.align.register_pairs`' batch of 256, so the batches (and the results) are the same as in
#: one call; 1,024 pairs of 128 px slices are 64 MB per side, where a chunk of 256 queries x their candidates
#: would gather several hundred MB.
PAIR_BLOCK = 1024


def register_blocks(
    fixed: Any,
    fixed_rows: np.ndarray,
    moving: Any,
    moving_rows: np.ndarray,
    *,
    flips: np.ndarray | None = None,
    **kwargs: Any,
) -> Alignment:
    """:func:`inspector.align.register_pairs` of ``fixed[fixed_rows[i]]`` onto ``moving[moving_rows[i]]`` for
    every i, gathering :data:`PAIR_BLOCK` pairs' images at a time from the stacks (arrays or memory maps,
    (n, H, W)), so memory is bounded whatever the number of pairs.

    ``flips`` (one orientation per pair, or None) and ``kwargs`` are passed on. Returns one Alignment over
    all pairs, in order.
    """
    fr, mr = np.asarray(fixed_rows, np.int64), np.asarray(moving_rows, np.int64)
    if fr.shape != mr.shape:
        raise ValueError(f"fixed_rows {fr.shape} and moving_rows {mr.shape} must have the same shape.")
    parts = []
    for a in range(0, max(len(fr), 1), PAIR_BLOCK):
        sl = slice(a, a + PAIR_BLOCK)
        parts.append(
            register_pairs(fixed[fr[sl]], moving[mr[sl]], flips=None if flips is None else flips[sl], **kwargs)
        )
        release_pages(fixed, moving)  # the gathered rows' pages of a slice store leave this process
    return parts[0] if len(parts) == 1 else Alignment.concat(parts)


@runtime_checkable
class Matcher(Protocol):
    """What the pipeline's match stage needs of a scorer (the default mode's and the paper's).

    ``fit`` on the training features, ``score_samples`` on every view of the query features, and
    ``null_scores`` for the scores of slices known not to be copies; all return :class:`MatchResult`-shaped
    evidence, so the calibration, the attribution and the result never branch on the mode.
    """

    def fit(
        self,
        train_layers: Mapping[str, np.ndarray],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
    ) -> Matcher: ...

    def score_samples(
        self,
        query_views: Mapping[str, Mapping[str, np.ndarray]],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
        stage: str = "scoring",
    ) -> MatchResult: ...

    def null_scores(
        self,
        *,
        holdout_views: Mapping[str, Mapping[str, np.ndarray]] | None,
        holdout_images: np.ndarray | None,
        train_views: Mapping[str, Mapping[str, np.ndarray]] | None,
        train_images: np.ndarray | None,
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, str]: ...


@dataclass
class MatchResult:
    """Scores of query slices against the training set (one row per query).

    Attributes
    ----------
    similarity : np.ndarray, shape (m,)
        The score that is calibrated: aligned NCC of the best shortlisted candidate when re-ranking,
        else the feature similarity. Higher = more memorised.
    feature_similarity : np.ndarray, shape (m,)
        Mean whitened cosine to the best feature candidate, over all views.
    layer_similarity : np.ndarray, shape (m, L)
        Per layer, whitened cosine to the nearest training slice under the matched view.
    nearest : np.ndarray of int, shape (m,)
        Training index of the final match.
    view : np.ndarray of str, shape (m,)
        The query view under which the final match was found.
    neighbours, neighbour_sims : dict of str to np.ndarray, shape (m, top_k)
        Per layer, nearest training indices (``-1`` = none) and their similarities under ``view``.
    margin : np.ndarray, shape (m,)
        Feature similarity to the matched subject minus that to the best other subject (a lower bound
        when no other subject is among the searched candidates).
    alignment : Alignment or None
        The final match's registration (:class:`inspector.align.Alignment`, with ``train_index``). None
        without re-ranking and in paper mode.
    candidates : np.ndarray of int, shape (m, K), or None
        The shortlist of training indices that were verified (``-1`` = none), best feature match first. None
        in paper mode.
    """

    similarity: np.ndarray
    feature_similarity: np.ndarray
    layer_similarity: np.ndarray
    nearest: np.ndarray
    view: np.ndarray
    neighbours: dict[str, np.ndarray]
    neighbour_sims: dict[str, np.ndarray]
    margin: np.ndarray
    alignment: Alignment | None = None
    candidates: np.ndarray | None = None


class MemorizationScorer:
    """View-invariant, alignment-verified nearest-neighbour scorer (the default mode).

    Parameters
    ----------
    shrinkage : str or float
        Covariance shrinkage of the per-layer whitening (``"ledoit-wolf"`` or a coefficient in [0, 1]).
    shortlist : int
        Training candidates per query that are registered and re-ranked.
    top_k : int
        Neighbours kept per layer for display and attribution.
    rerank : bool
        Register the shortlist and score by aligned NCC; otherwise score by feature similarity.
    align_size : int
        Working resolution of the registration (pixels).
    align_flips : {"all", "matched"}
        ``"all"`` (default): each candidate is registered under all four flips and the best is kept;
        ``"matched"``: only under the flip of the feature view it was found in. Features trained to be
        flip-invariant (``ssl``) say little about the flip, and the benchmark (benchmarks/RESULTS.md)
        measured ``"all"`` better on shifts, crops, noise and rotations.
    margin_k : int
        Candidates searched per view for the shortlist and the subject margin.
    descriptor_shortlist : int
        Extra candidates per query from the moment-normalised structure descriptor
        (:func:`inspector.descriptors.structure_descriptor`, whitened on T, searched over every view), added
        to the ``shortlist`` of the encoder's features before registration. An encoder trained for invariance
        stops telling look-alike subjects of one protocol apart as the cohort grows; the descriptor does not
        (benchmarks/RESULTS.md, look-alike cohorts). ``0`` turns it off.
    descriptor_zooms : sequence of float
        The descriptor search also holds each training slice zoomed in by these factors
        (:data:`inspector.descriptors.DESCRIPTOR_ZOOMS`): a copy written at a narrower field of view or
        cropped has its anatomy cut by the frame, so its moments (and the moment-normalised thumbnail) differ
        from those of its whole source but match the source zoomed by about as much. A hit on a zoomed entry
        is a candidate for its training slice; the registration then finds the exact zoom. ``()`` turns it off.
    descriptor_zoom_sizes : sequence of int, optional
        The thumbnail sizes (a subset of :data:`inspector.descriptors.DESCRIPTOR_SIZES`) the zoomed entries keep
        and are searched by (:data:`inspector.descriptors.DESCRIPTOR_ZOOM_SIZES`); None: every size.
    rotation_shortlist : int
        Extra candidates per query from the rotation-invariant descriptor
        (:func:`inspector.descriptors.rotation_descriptor`, whitened on T; one search, as it is the same under
        every view): a copy rotated far from the eight orientations is found neither by the encoder's features
        nor by the moment-normalised thumbnails. ``0`` turns it off.
    max_angle : float
        Largest in-plane rotation (degrees, beyond the orientations) the registration accepts; above 20 it
        also starts from the angle read off the slices' rings (:func:`inspector.align.register_pairs`). 180
        (default): any angle; 15: small rotations only (the earlier default).
    verify_top : int
        Pruned verification: every candidate is first registered under every orientation at 32 px only (a
        coarse ECC), and only the ``verify_top`` best per query are registered at ``align_size`` and scored;
        ``0`` registers every candidate in full.
    device : str
        ``auto``, ``cpu`` or ``cuda`` for the search and the registration.
    chunk : int
        Queries registered per chunk (bounds memory).
    executor : inspector.cluster.Cluster, optional
        Score the queries on a cluster's workers (:mod:`inspector.cluster`): more than ``chunk`` queries are cut
        into parts of whole chunks, each worker holds one copy of the fitted scorer, and the parts' results are
        joined in order; the same numbers as without it. Not pickled with the scorer.
    """

    def __init__(
        self,
        *,
        shrinkage: str | float = "ledoit-wolf",
        shortlist: int = 5,
        top_k: int = 5,
        rerank: bool = True,
        align_size: int = 64,
        align_flips: str = "all",
        margin_k: int = 32,
        descriptor_shortlist: int = 5,
        descriptor_zooms: Sequence[float] = DESCRIPTOR_ZOOMS,
        descriptor_zoom_sizes: Sequence[int] | None = DESCRIPTOR_ZOOM_SIZES,
        rotation_shortlist: int = 5,
        max_angle: float = 180.0,
        verify_top: int = 3,
        device: str = "auto",
        chunk: int = 256,
        executor: Any = None,
    ) -> None:
        self.shrinkage = shrinkage
        self.shortlist = shortlist
        self.top_k = top_k
        self.rerank = rerank
        self.align_size = align_size
        self.align_flips = align_flips
        self.margin_k = margin_k
        self.descriptor_shortlist = descriptor_shortlist
        self.descriptor_zooms = tuple(float(z) for z in descriptor_zooms)
        zs = descriptor_zoom_sizes
        self.descriptor_zoom_sizes = None if zs is None else tuple(int(k) for k in zs)
        self.rotation_shortlist = rotation_shortlist
        self.max_angle = max_angle
        self.verify_top = verify_top
        self.device = device
        self.chunk = chunk
        self.executor = executor

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_layers: Mapping[str, np.ndarray],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
    ) -> MemorizationScorer:
        """Fit the per-layer whiteners on the training features.

        Parameters
        ----------
        train_layers : mapping of str to np.ndarray, shape (n, C_layer)
            Identity-view features of the training cohort T.
        images : np.ndarray, shape (n, H, W), optional
            Training slices in [0, 1]; required when ``rerank``.
        groups : array of str, shape (n,), optional
            Subject ID per training slice (attribution, leave-one-subject-out).

        Returns
        -------
        MemorizationScorer
        """
        if not train_layers:
            raise ValueError("train_layers is empty; pass {layer_name: (n, C) array} for at least one layer.")
        if self.shortlist < 1 or self.top_k < 1:
            raise ValueError(f"shortlist and top_k must be >= 1; got {self.shortlist}, {self.top_k}.")
        if self.align_flips not in ("all", "matched"):
            raise ValueError(f"align_flips must be 'all' or 'matched'; got {self.align_flips!r}.")
        if self.executor is not None:  # the workers' copy of an earlier fit
            self.executor.forget(self)
        self._indexes: dict[str, NeighbourIndex] = {}
        self.layers_ = list(train_layers)
        n = {np.asarray(v).shape[0] for v in train_layers.values()}
        if len(n) != 1:
            raise ValueError(f"All layers must have the same number of training rows; got {sorted(n)}.")
        self.n_ = n.pop()
        if self.n_ < 2:
            raise ValueError(f"The training cohort has {self.n_} slice(s); at least 2 are needed to whiten features.")
        # the whiteners stream their statistics and transforms in blocks of rows: no float64 copy of a whole base
        self.whiteners_ = {
            layer: Whitener(method="shrinkage", shrinkage=self.shrinkage).fit(x) for layer, x in train_layers.items()
        }
        self.train_white_ = {layer: self._white(layer, x) for layer, x in train_layers.items()}
        self.train_concat_ = self._concat(self.train_white_)
        if self.rerank:
            if images is None:
                raise ValueError("rerank=True needs the training images: fit(..., images=(n, H, W) array).")
            images = np.asarray(images, np.float32)
            if images.ndim != 3 or images.shape[0] != self.n_:
                raise ValueError(f"images must have shape ({self.n_}, H, W); got {images.shape}.")
        self.images_ = images
        if self.verify_top < 0:
            raise ValueError(f"verify_top must be >= 0 (0 = verify every candidate); got {self.verify_top}.")
        if self.descriptor_shortlist < 0:
            raise ValueError(f"descriptor_shortlist must be >= 0; got {self.descriptor_shortlist}.")
        if self.rotation_shortlist < 0:
            raise ValueError(f"rotation_shortlist must be >= 0; got {self.rotation_shortlist}.")
        if not 0 <= float(self.max_angle) <= 180:
            raise ValueError(f"max_angle must be in [0, 180] degrees; got {self.max_angle}.")
        self.desc_whiteners_: dict[str, Whitener] = {}
        self.desc_zoom_train_: np.ndarray | None = None
        if self.rerank and self.descriptor_shortlist > 0:
            desc = structure_descriptor(images)
            self.desc_whiteners_ = {
                k: Whitener(method="shrinkage", shrinkage=self.shrinkage).fit(x) for k, x in desc.items()
            }
            bad = [z for z in self.descriptor_zooms if not (np.isfinite(z) and 1.0 < z <= 4.0)]
            if bad:
                raise ValueError(f"descriptor_zooms must be factors in (1, 4] (zoomed in); got {bad}.")
            self.desc_train_ = self._desc_concat(desc)
            del desc
            zsizes = self._zoom_sizes()
            # (n * zooms, d): every slice at the first zoom, then at the second, ...; searched on their own
            # so that they add candidates instead of displacing the whole slices' (a zoomed-out copy's); each
            # zoom written into its rows as computed (no list of parts and a concatenated copy)
            zoomed: np.ndarray | None = None
            for j, z in enumerate(self.descriptor_zooms):
                part = self._desc_concat(structure_descriptor(images, zsizes, zoom=z))
                if zoomed is None:
                    zoomed = np.empty((len(self.descriptor_zooms) * self.n_, part.shape[1]), np.float32)
                zoomed[j * self.n_ : (j + 1) * self.n_] = part
                del part
            self.desc_zoom_train_ = zoomed
        self.rot_whitener_: Whitener | None = None
        if self.rerank and self.rotation_shortlist > 0:
            rot = rotation_descriptor(images)
            self.rot_whitener_ = Whitener(method="shrinkage", shrinkage=self.shrinkage).fit(rot)
            self.rot_train_ = self._rot_white(rot)
        self.groups_ = None if groups is None else np.asarray(groups).astype(str)
        if self.groups_ is not None and self.groups_.shape != (self.n_,):
            raise ValueError(f"groups must have shape ({self.n_},); got {self.groups_.shape}.")
        return self

    def _white(self, layer: str, x: np.ndarray) -> np.ndarray:
        return self.whiteners_[layer].transform(x)

    def _concat(self, white: Mapping[str, np.ndarray]) -> np.ndarray:
        return _scaled_concat([white[layer] for layer in self.layers_])

    def _rot_white(self, x: np.ndarray) -> np.ndarray:
        assert self.rot_whitener_ is not None
        return _scaled_concat([self.rot_whitener_.transform(x)])

    def _desc_concat(self, desc: Mapping[str, np.ndarray]) -> np.ndarray:
        w = self.desc_whiteners_
        return _scaled_concat([w[k].transform(x) for k, x in desc.items()])

    def _zoom_sizes(self) -> tuple[int, ...]:
        """Thumbnail sizes of the zoomed descriptor entries (checked against the whole slices' layers)."""
        sizes = tuple(int(k[2:]) for k in self.desc_whiteners_)
        z = self.__dict__.get("descriptor_zoom_sizes")  # absent: a matcher pickled before the option
        z = sizes if z is None else z
        bad = [k for k in z if k not in sizes]
        if bad or not z:
            raise ValueError(
                f"descriptor_zoom_sizes must be a non-empty subset of the descriptor's sizes {sizes}; got {z}."
            )
        return tuple(z)

    def _descriptor_candidates(
        self,
        images: np.ndarray,
        views: list[str],
        qg: np.ndarray | None,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Shortlists from the structure descriptor under every orientation among the views (a small-rotation view
        adds none), one per search base (the whole slices,
        then the zoomed entries when there are any): each (sims, idx, view index) with shapes (m, V*k),
        (m, V*k), (V*k,); a zoomed entry's index is that of its training slice."""
        bases = [(self.desc_train_, 1)]
        if self.desc_zoom_train_ is not None:
            bases.append((self.desc_zoom_train_, self.desc_zoom_train_.shape[0] // self.n_))
        query = structure_descriptor(images)
        per_view = []  # (view index, descriptor layers) under each orientation among the views
        for i, v in enumerate(views):
            view = parse_view(v)
            if not isinstance(view, View):  # a small rotation ("rot+5"): the registration's search covers it
                continue
            dv = {}
            for name, x in query.items():
                side = int(round(np.sqrt(x.shape[1])))
                dv[name] = np.ascontiguousarray(view.apply(x.reshape(-1, side, side))).reshape(x.shape[0], -1)
            per_view.append((i, dv))
        zoom_layers = [f"mn{k}" for k in self._zoom_sizes()] if self.desc_zoom_train_ is not None else []
        out = []
        for b, (base, entries) in enumerate(bases):
            # a slice may hit under several zooms: ask for enough neighbours to keep k distinct slices
            k = min(base.shape[0], self.descriptor_shortlist * entries)
            sims, idx, view_of = [], [], []
            for i, dv in per_view:
                q = self._desc_concat(dv) if b == 0 else self._desc_concat({n: dv[n] for n in zoom_layers})
                s_, ix = self._search("desc" if b == 0 else "desc_zoom", q, k, qg)
                sims.append(s_)
                idx.append(np.where(ix >= 0, ix % self.n_, -1))
                view_of.append(np.full(ix.shape[1], i))
            out.append((np.concatenate(sims, 1), np.concatenate(idx, 1), np.concatenate(view_of)))
        return out

    def _search(self, base: str, query: np.ndarray, k: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``query`` in one of the fitted search bases, through an index built once per base and fit.

        ``base``: ``"concat"`` (the whitened layers, concatenated), ``"layer:<name>"``, ``"desc"`` or ``"desc_zoom"``
        (the structure descriptor of the training slices, and of their zoomed entries) or ``"rot"`` (their
        rotation-invariant descriptor). ``groups`` (m,) excludes
        each query's own group (leave-one-subject-out). The same answer as :func:`~inspector.index.knn` on that
        base; the index (normalised base, group codes, an approximate or GPU index when one is used) is reused by
        every view and every query set instead of being rebuilt per call.
        """
        indexes = self.__dict__.setdefault("_indexes", {})
        index = indexes.get(base)
        if index is None:
            if base == "concat":
                x, entries = self.train_concat_, 1
            elif base.startswith("layer:"):
                x, entries = self.train_white_[base.split(":", 1)[1]], 1
            elif base == "desc":
                x, entries = self.desc_train_, 1
            elif base == "rot" and self.__dict__.get("rot_whitener_") is not None:
                x, entries = self.rot_train_, 1
            elif base == "desc_zoom" and self.desc_zoom_train_ is not None:
                x = self.desc_zoom_train_
                entries = x.shape[0] // self.n_
            else:
                raise KeyError(f"no search base {base!r}")
            g = None if self.groups_ is None else np.tile(self.groups_, entries)
            index = NeighbourIndex(metric="ip", device=self.device).fit(x, groups=g)
            indexes[base] = index
        return index.search(query, k, groups=groups)

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_concat_"):
            raise RuntimeError("MemorizationScorer is not fitted; call fit(train_layers, ...) first.")

    # ------------------------------------------------------------------ scoring
    def score_samples(
        self,
        query_views: Mapping[str, Mapping[str, np.ndarray]],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
        stage: str = "scoring",
    ) -> MatchResult:
        """Score query slices given the features of each of their views.

        Parameters
        ----------
        query_views : mapping of view name to {layer: np.ndarray of shape (m, C_layer)}
            Must include ``"id"``; every view must hold every fitted layer.
        images : np.ndarray, shape (m, H, W), optional
            The query slices in [0, 1]; required when ``rerank``.
        groups : array of str, shape (m,), optional
            With fitted training groups, training slices of the query's own group are never matched
            (the leave-one-subject-out null).
        progress : callable, optional
            ``progress(stage, done, total)``.
        stage : str
            Stage name for the progress callback.

        Returns
        -------
        MatchResult
        """
        self._check_fitted()
        if "id" not in query_views:
            raise ValueError(f"query_views must include the 'id' view; got {list(query_views)}.")
        views = list(query_views)
        m = np.asarray(query_views["id"][self.layers_[0]]).shape[0]
        for v in views:
            missing = [layer for layer in self.layers_ if layer not in query_views[v]]
            if missing:
                raise ValueError(f"View {v!r} lacks layer(s) {missing}; fitted layers are {self.layers_}.")
        qg = None
        if groups is not None:
            if self.groups_ is None:
                raise ValueError("groups given for the queries but the scorer was fitted without training groups.")
            qg = np.asarray(groups).astype(str)
            if qg.shape != (m,):
                raise ValueError(f"groups must have shape ({m},); got {qg.shape}.")
        if self.rerank:
            if images is None:
                raise ValueError("rerank=True needs the query images: score_samples(..., images=(m, H, W)).")
            images = np.asarray(images, np.float32)
            if images.ndim != 3 or images.shape[0] != m:
                raise ValueError(f"images must have shape ({m}, H, W); got {images.shape}.")

        if self.executor is not None and m > self.chunk:
            return self._score_on_cluster(query_views, images, qg, progress, stage)

        # 1. whitened features per view, concatenated search over all views
        white = {v: {layer: self._white(layer, query_views[v][layer]) for layer in self.layers_} for v in views}
        kc = min(self.n_, max(self.shortlist, self.margin_k))
        sims_v, idx_v = [], []
        for i, v in enumerate(views):
            s, ix = self._search("concat", self._concat(white[v]), kc, qg)
            sims_v.append(s)
            idx_v.append(ix)
            if progress:
                progress(f"searching:{stage}", i + 1, len(views))
        sims = np.concatenate(sims_v, axis=1)  # (m, V*kc)
        idx = np.concatenate(idx_v, axis=1)
        view_of = np.repeat(np.arange(len(views)), [a.shape[1] for a in sims_v])
        cand, cand_sim, cand_view = _merge_candidates(sims, idx, view_of, self.shortlist)
        feature_similarity = np.where(cand[:, 0] >= 0, cand_sim[:, 0], -1.0).astype(np.float32)
        if self.rerank and self.descriptor_shortlist > 0 and self.desc_whiteners_:
            for d_s, d_i, d_v in self._descriptor_candidates(images, views, qg):
                d_c, _, d_cv = _merge_candidates(d_s, d_i, d_v, self.descriptor_shortlist)
                cand, cand_view = _union_candidates(cand, cand_view, d_c, d_cv)
        if self.rerank and self.rotation_shortlist > 0 and self.__dict__.get("rot_whitener_") is not None:
            k_rot = min(self.n_, self.rotation_shortlist)
            _, r_i = self._search("rot", self._rot_white(rotation_descriptor(images)), k_rot, qg)
            # the same under every view: its candidates carry the identity view (the registration finds the
            # orientation and the angle)
            cand, cand_view = _union_candidates(cand, cand_view, r_i, np.zeros_like(r_i))

        # 2. alignment-verified re-ranking of the shortlist
        alignment: Alignment | None = None
        if self.rerank:
            choice, alignment = self._rerank(images, cand, cand_view, views, progress, stage)
            similarity = alignment.ncc.astype(np.float32)
        else:
            choice = np.zeros(m, dtype=np.int64)
            similarity = feature_similarity.copy()
        rows = np.arange(m)
        nearest = cand[rows, choice]
        best_view_i = cand_view[rows, choice]
        best_view_i = np.where(nearest >= 0, best_view_i, 0)
        view = np.array([views[i] for i in best_view_i], dtype=object)

        # 3. per-layer neighbours under the matched view (display, attribution)
        k = min(self.top_k, self.n_)
        neighbours = {layer: np.full((m, k), -1, np.int64) for layer in self.layers_}
        neighbour_sims = {layer: np.full((m, k), -1.0, np.float32) for layer in self.layers_}
        for vi, v in enumerate(views):
            sel = np.flatnonzero(best_view_i == vi)
            if sel.size == 0:
                continue
            for layer in self.layers_:
                s, ix = self._search(f"layer:{layer}", white[v][layer][sel], k, None if qg is None else qg[sel])
                neighbours[layer][sel] = ix
                neighbour_sims[layer][sel] = np.where(ix >= 0, s, -1.0)
        layer_similarity = np.stack([neighbour_sims[layer][:, 0] for layer in self.layers_], axis=1)

        # 4. margin to the next subject, in feature-similarity units
        margin = self._margins(sims, idx, nearest)
        return MatchResult(
            similarity=np.nan_to_num(similarity, nan=-1.0, posinf=1.0, neginf=-1.0),
            feature_similarity=feature_similarity,
            layer_similarity=layer_similarity.astype(np.float32),
            nearest=nearest.astype(np.int64),
            view=view,
            neighbours=neighbours,
            neighbour_sims=neighbour_sims,
            margin=margin,
            alignment=alignment,
            candidates=cand,
        )

    # ------------------------------------------------------------------ on a cluster
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["executor"] = None  # a connection to a cluster is not part of the fitted scorer
        state.pop("holdout_result_", None)
        state.pop("_indexes", None)  # rebuilt on first use (an approximate or GPU faiss index does not pickle)
        return state

    def _score_on_cluster(
        self,
        query_views: Mapping[str, Mapping[str, np.ndarray]],
        images: np.ndarray | None,
        groups: np.ndarray | None,
        progress: ProgressFn | None,
        stage: str,
    ) -> MatchResult:
        """score_samples over parts of whole ``chunk``s of the queries, on the executor's workers, joined in order."""
        from .cluster import part_bounds

        ex = self.executor
        m = np.asarray(query_views["id"][self.layers_[0]]).shape[0]
        bounds = part_bounds(m, self.chunk, 2 * ex.n_workers)
        parts = [
            (
                {v: {layer: np.asarray(a)[s:e] for layer, a in d.items()} for v, d in query_views.items()},
                None if images is None else images[s:e],
                None if groups is None else groups[s:e],
                stage,
            )
            for s, e in bounds
        ]
        log.info("scoring %d %s queries in %d parts on %d workers", m, stage, len(parts), ex.n_workers)
        done = [0]

        def on_done(i: int) -> None:
            done[0] += bounds[i][1] - bounds[i][0]
            if progress:
                progress(f"aligning:{stage}", done[0], m)

        if progress:
            progress(f"aligning:{stage}", 0, m)
        return concat_match_results(ex.map_parts(_score_part, self, parts, on_done=on_done))

    def null_scores(
        self,
        *,
        holdout_views: Mapping[str, Mapping[str, np.ndarray]] | None,
        holdout_images: np.ndarray | None,
        train_views: Mapping[str, Mapping[str, np.ndarray]] | None,
        train_images: np.ndarray | None,
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, str]:
        """Scores of slices known not to be copies, through exactly the synthetic path.

        With a holdout, ``s(H -> T)`` (``"holdout"``); otherwise every training slice scored against the
        training slices of the *other* subjects (``"leave-one-subject-out"``).

        Returns
        -------
        (np.ndarray of shape (n_null,), str)
            The null similarities (float64) and the null's kind.

        Raises
        ------
        InsufficientDataError
            Without a holdout when the training set holds a single subject.
        """
        self._check_fitted()
        if holdout_views is not None:
            res = self.score_samples(holdout_views, images=holdout_images, progress=progress, stage="holdout")
            self.holdout_result_ = res  # the holdout's matches, for the volume stage (same path as the synthetic)
            return res.similarity.astype(np.float64), "holdout"
        if self.groups_ is None or len(set(self.groups_)) < 2:
            raise InsufficientDataError(
                "The training cohort holds a single subject, so the leave-one-subject-out null cannot be built. "
                "Give a holdout of real, unseen scans (--holdout) or more training subjects."
            )
        if train_views is None:
            raise ValueError("Without a holdout the null needs the training set's views (train_views=...).")
        res = self.score_samples(train_views, images=train_images, groups=self.groups_, progress=progress, stage="null")
        return res.similarity.astype(np.float64), "leave-one-subject-out"

    def _rerank(
        self,
        images: np.ndarray,
        cand: np.ndarray,
        cand_view: np.ndarray,
        views: list[str],
        progress: ProgressFn | None,
        stage: str,
    ) -> tuple[np.ndarray, Alignment]:
        m, kk = cand.shape
        ncc = np.full((m, kk), -1.0, np.float32)
        angle = np.zeros((m, kk), np.float32)
        scale = np.ones((m, kk), np.float32)
        shift = np.zeros((m, kk, 2), np.float32)
        flip = np.full((m, kk), View.ID.value, dtype=object)
        flip_names = np.array([training_to_query(v).value for v in views], dtype=object)
        # "all": every orientation among the query views, plus the four flips (a flip-invariant encoder's
        # view says nothing about the flip)
        orientations = list(dict.fromkeys([*FLIPS, *(View.parse(v) for v in flip_names)]))
        if progress:
            progress(f"aligning:{stage}", 0, m)
        for start in range(0, m, self.chunk):
            rows = np.arange(start, min(m, start + self.chunk))
            r, c = np.nonzero(cand[rows] >= 0)
            given = None
            if r.size and 0 < self.verify_top < kk:
                # pruning: every candidate under every orientation at the coarse level only; the best
                # `verify_top` per query (those that can still win) are then verified at full resolution
                # under the orientation found here
                q = rows[r]
                pre = register_blocks(
                    images,
                    q,
                    self.images_,
                    cand[q, c],
                    flips=None if self.align_flips == "all" else flip_names[cand_view[q, c]],
                    orientations=orientations,
                    size=min(32, self.align_size),
                    coarse_size=min(32, self.align_size),
                    iterations=(8, 0),
                    flip_candidates=1,
                    max_angle=float(self.max_angle),
                    device=self.device,
                )
                pre_s = np.full((len(rows), kk), -np.inf, np.float32)
                pre_s[r, c] = np.nan_to_num(pre.ncc, nan=-1.0)
                pre_o = np.full((len(rows), kk), View.ID.value, dtype=object)
                pre_o[r, c] = pre.flip
                top = np.argsort(-pre_s, axis=1, kind="stable")[:, : self.verify_top]
                keep = np.zeros((len(rows), kk), bool)
                np.put_along_axis(keep, top, True, axis=1)
                keep &= np.isfinite(pre_s)
                r, c = np.nonzero(keep)
                given = pre_o[r, c]
            if r.size:
                q = rows[r]
                t = cand[q, c]
                if given is None:
                    given = None if self.align_flips == "all" else flip_names[cand_view[q, c]]
                al = register_blocks(
                    images,
                    q,
                    self.images_,
                    t,
                    flips=given,
                    orientations=orientations,
                    size=self.align_size,
                    max_angle=float(self.max_angle),
                    device=self.device,
                )
                ncc[q, c] = al.ncc
                angle[q, c] = al.angle
                scale[q, c] = al.scale
                shift[q, c] = al.shift
                flip[q, c] = al.flip
            if progress:
                progress(f"aligning:{stage}", int(rows[-1]) + 1, m)
        ncc = np.nan_to_num(ncc, nan=-1.0)
        choice = np.argmax(ncc, axis=1)
        rows = np.arange(m)
        alignment = Alignment(
            ncc=ncc[rows, choice],
            angle=angle[rows, choice],
            scale=scale[rows, choice],
            shift=shift[rows, choice],
            flip=flip[rows, choice].astype(str),
            train_index=cand[rows, choice],
        )
        return choice, alignment

    def _margins(self, sims: np.ndarray, idx: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        m = len(nearest)
        out = np.zeros(m, np.float32)
        if self.groups_ is None:
            return out
        valid = idx >= 0
        subj = np.where(valid, self.groups_[np.clip(idx, 0, None)], "")
        s = np.where(valid, sims, -np.inf)
        for j in range(m):
            if nearest[j] < 0:
                continue
            mine = self.groups_[nearest[j]]
            same = subj[j] == mine
            best_same = s[j][same].max() if same.any() else -np.inf
            other = valid[j] & ~same
            if other.any():
                best_other = s[j][other].max()
            else:  # no other subject among the candidates: a lower bound
                best_other = s[j][valid[j]].min() if valid[j].any() else best_same
            out[j] = float(best_same - best_other) if np.isfinite(best_same) else 0.0
        return out


def _score_part(scorer: MemorizationScorer, part: tuple[Any, ...]) -> MatchResult:
    """One part of :meth:`MemorizationScorer._score_on_cluster`, on a worker."""
    views, images, groups, stage = part
    return scorer.score_samples(views, images=images, groups=groups, stage=stage)


def concat_match_results(results: Sequence[MatchResult]) -> MatchResult:
    """Join the results of consecutive parts of one query set into one, rows in order.

    Parameters
    ----------
    results : sequence of MatchResult
        Of the same matcher and layers; ``candidates`` may differ in width (padded with ``-1`` on the right).

    Returns
    -------
    MatchResult
    """
    if not results:
        raise ValueError("concat_match_results needs at least one MatchResult.")
    if len(results) == 1:
        return results[0]

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in results])

    def cat_dict(name: str) -> dict[str, np.ndarray]:
        first = getattr(results[0], name)
        return {layer: np.concatenate([getattr(r, name)[layer] for r in results]) for layer in first}

    alignment = None
    if all(r.alignment is not None for r in results):
        alignment = Alignment.concat([r.alignment for r in results])
    candidates = None
    if all(r.candidates is not None for r in results):
        width = max(r.candidates.shape[1] for r in results)
        candidates = np.concatenate(
            [np.pad(r.candidates, ((0, 0), (0, width - r.candidates.shape[1])), constant_values=-1) for r in results]
        )
    return MatchResult(
        similarity=cat("similarity"),
        feature_similarity=cat("feature_similarity"),
        layer_similarity=cat("layer_similarity"),
        nearest=cat("nearest"),
        view=cat("view"),
        neighbours=cat_dict("neighbours"),
        neighbour_sims=cat_dict("neighbour_sims"),
        margin=cat("margin"),
        alignment=alignment,
        candidates=candidates,
    )


def _scaled_concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate L whitened, L2-normalised blocks (n, C_l), each scaled by 1/sqrt(L): one inner product then
    gives the mean of the L cosines. Returns (n, sum C_l) float32, C-contiguous."""
    scale = np.float32(1.0 / np.sqrt(len(parts)))
    out = np.empty((parts[0].shape[0], sum(x.shape[1] for x in parts)), np.float32)
    c = 0
    for x in parts:  # written in place: no scaled copy of every part before the concatenation
        np.multiply(x, scale, out=out[:, c : c + x.shape[1]])
        c += x.shape[1]
    return out


def _union_candidates(
    a: np.ndarray, a_view: np.ndarray, b: np.ndarray, b_view: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise union of two candidate lists (``-1`` padded): ``a``'s order first, then ``b``'s new ones.

    Returns cand (m, Ka + Kb) int64 and its view index (m, Ka + Kb).
    """
    m, ka = a.shape
    kb = b.shape[1]
    cand = np.full((m, ka + kb), -1, np.int64)
    view = np.zeros((m, ka + kb), np.int64)
    cand[:, :ka], view[:, :ka] = a, a_view
    dup = (b[:, :, None] == a[:, None, :]).any(-1) | (b < 0)
    for j in range(m):
        new = np.flatnonzero(~dup[j])
        cand[j, ka : ka + len(new)] = b[j, new]
        view[j, ka : ka + len(new)] = b_view[j, new]
    return cand, view


def _merge_candidates(
    sims: np.ndarray, idx: np.ndarray, view_of: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique training candidates per row, best view each, sorted by similarity.

    Parameters
    ----------
    sims, idx : np.ndarray, shape (m, P)
        Candidate similarities and training indices pooled over views (``-1`` = none).
    view_of : np.ndarray of int, shape (P,)
        The view index of each column.
    k : int
        Candidates kept per row.

    Returns
    -------
    cand (m, k) int64 (``-1`` padded), cand_sim (m, k) float32, cand_view (m, k) int64
    """
    m, _ = sims.shape
    s = np.where(idx >= 0, sims, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=1)
    i_sorted = np.take_along_axis(idx, order, axis=1)
    v_sorted = view_of[order]
    cand = np.full((m, k), -1, np.int64)
    cand_sim = np.full((m, k), -1.0, np.float32)
    cand_view = np.zeros((m, k), np.int64)
    for j in range(m):
        ok = np.isfinite(s_sorted[j])
        ij = i_sorted[j][ok]
        _, first = np.unique(ij, return_index=True)
        first = np.sort(first)[:k]
        n = len(first)
        cand[j, :n] = ij[first]
        cand_sim[j, :n] = s_sorted[j][ok][first]
        cand_view[j, :n] = v_sorted[j][ok][first]
    return cand, cand_sim, cand_view


class PaperMatcher:
    """Deo et al. 2026's method (:class:`inspector.scores.PaperScorer`) behind the :class:`Matcher` protocol.

    The similarity is the paper's: top-1 whitened cosine per layer (ZCA), geometric mean over layers; the
    null is its split-half bootstrap. The final match of a query is the training slice that is top-1 in
    most layers (ties: the deepest layer's).

    Parameters
    ----------
    n_bootstrap : int
        Split-half bootstrap rounds of the null.
    seed : int
    top_k : int
        Neighbours kept per layer for display and attribution.
    scorer : PaperScorer, optional
        An already fitted scorer to reuse (``fit`` then only records the groups).
    """

    def __init__(self, *, n_bootstrap: int = 10, seed: int = 0, top_k: int = 5, scorer: PaperScorer | None = None):
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.top_k = top_k
        self.scorer = scorer

    def fit(
        self,
        train_layers: Mapping[str, np.ndarray],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
    ) -> PaperMatcher:
        """Fit the paper's whiteners and null on the training features (``images`` are not used)."""
        if self.scorer is not None and hasattr(self.scorer, "null_"):
            self.scorer_ = self.scorer
        else:
            self.scorer_ = PaperScorer(n_bootstrap=self.n_bootstrap, seed=self.seed).fit(train_layers)
        n = self.scorer_.n_train_ if hasattr(self.scorer_, "n_train_") else None
        self.groups_ = None if groups is None else np.asarray(groups).astype(str)
        if self.groups_ is not None and n is not None and self.groups_.shape != (n,):
            raise ValueError(f"groups must have shape ({n},); got {self.groups_.shape}.")
        return self

    def score_samples(
        self,
        query_views: Mapping[str, Mapping[str, np.ndarray]],
        *,
        images: np.ndarray | None = None,
        groups: Sequence[str] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
        stage: str = "scoring",
    ) -> MatchResult:
        """Score the identity view of the queries (the paper matches no other view)."""
        if not hasattr(self, "scorer_"):
            raise RuntimeError("PaperMatcher is not fitted; call fit(train_layers, ...) first.")
        if "id" not in query_views:
            raise ValueError(f"query_views must include the 'id' view; got {list(query_views)}.")
        ps = self.scorer_.score_samples(query_views["id"], top_k=self.top_k)
        m = len(ps.similarity)
        nearest = paper_nearest(ps.neighbours, ps.layers)
        margin = (
            np.zeros(m, np.float32)
            if self.groups_ is None
            else paper_margin(ps.neighbours, ps.neighbour_sims, self.groups_, nearest)
        )
        if progress:
            progress(f"scoring:{stage}", 1, 1)
        return MatchResult(
            similarity=np.asarray(ps.similarity, np.float64),
            feature_similarity=np.asarray(ps.similarity, np.float32),
            layer_similarity=np.asarray(ps.layer_similarity, np.float32),
            nearest=nearest.astype(np.int64),
            view=np.array([View.ID.value] * m, dtype=object),
            neighbours=ps.neighbours,
            neighbour_sims=ps.neighbour_sims,
            margin=margin,
            alignment=None,
        )

    def null_scores(
        self,
        *,
        holdout_views: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        holdout_images: np.ndarray | None = None,
        train_views: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        train_images: np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, str]:
        """The null of the paper mode's p-values and flags.

        With a holdout: the holdout scored with the paper's own similarity against all of T, exactly as the
        synthetic set is (``"holdout"``). Without: the paper's split-half bootstrap null, a maximum over half of
        T while G is scored against all of it, so it is not calibrated for flags (the calibration flags
        nothing then). The paper's MI and ONI always use the bootstrap null, as published.
        """
        if not hasattr(self, "scorer_"):
            raise RuntimeError("PaperMatcher is not fitted; call fit(train_layers, ...) first.")
        if holdout_views is not None:
            if progress:
                progress("scoring:holdout", 0, 1)
            return np.asarray(self.scorer_.score_samples(holdout_views["id"]).similarity, np.float64), "holdout"
        return np.asarray(self.scorer_.null_, np.float64), "split-half bootstrap"


def paper_nearest(neighbours: Mapping[str, np.ndarray], layers: Sequence[str]) -> np.ndarray:
    """The training slice that is top-1 in most layers (ties: the deepest layer's), shape (m,)."""
    top = np.stack([neighbours[layer][:, 0] for layer in layers], axis=1)  # (m, L)
    out = top[:, -1].copy()
    for j in range(top.shape[0]):
        vals, counts = np.unique(top[j], return_counts=True)
        if counts.max() > 1:
            out[j] = vals[np.argmax(counts)]
    return out


def paper_margin(
    neighbours: Mapping[str, np.ndarray], sims: Mapping[str, np.ndarray], train_subj: np.ndarray, nearest: np.ndarray
) -> np.ndarray:
    """Mean over layers of (best similarity to the matched subject − best to another subject), shape (m,)."""
    m = len(nearest)
    out = np.zeros(m, np.float32)
    for layer, nb in neighbours.items():
        s = sims[layer]
        subj = np.where(nb >= 0, train_subj[np.clip(nb, 0, None)], "")
        mine = train_subj[np.clip(nearest, 0, None)]
        for j in range(m):
            same = subj[j] == mine[j]
            a = s[j][same].max() if same.any() else s[j, 0]
            b = s[j][~same].max() if (~same).any() else s[j, -1]
            out[j] += (a - b) / len(neighbours)
    return out

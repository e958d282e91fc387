"""Inference (paper section 2.6; docs/method.md Inference): TTA, run selection, ensembles, merge, extras.

- :mod:`.tta`: the 16 distinct test-time views and ``tta_predict``;
- :mod:`.runs`: find runs by their run.json, select (all / best k per fold), load networks;
- :mod:`.predictor`: ``brats-lightning predict`` (one pipeline's ensemble, out-of-fold mode);
- :mod:`.merge`: ``brats-lightning merge`` (pipeline A + B label maps, docs/method.md table);
- :mod:`.ensemble`: ``python ensemble.py`` (A, B, merge, evaluation);
- :mod:`.postprocess`, :mod:`.uncertainty`: ET size threshold and BraTS uncertainty maps (beyond the paper).

Submodules are imported on use, so ``brats-lightning merge --help`` stays fast.
"""

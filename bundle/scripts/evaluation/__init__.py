"""Evaluation: the EndoVis / ISINet metrics, the label-map merge of class masks, pooling of folds' per-frame
statistics, report tables and cross-dataset class matching."""

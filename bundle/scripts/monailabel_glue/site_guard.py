"""The score a fine-tuning on a new site's labels is judged by: better there, not worse on the reference.

The app's train task (monailabel_app/lib/trainers.py) validates on two kinds of frames, in this order: first
the new labels' held-out frames (``site_frames`` of them: labelled frames that training did not see), then
the reference frames (the validation split of the data the served model was trained on, when the served
bundle names it: ``monailabel_reference_dataset``). :class:`SiteGuardMetric` scores each part with the
EndoVis Challenge IoU and gives as key metric the site's score while the reference score stays within
``reference_tolerance`` points of the served model's (the first validation's), else a score below every
IoU, so MONAI's best-model saver never picks a checkpoint that forgot the reference.
"""

from __future__ import annotations

from typing import Any

from ..evaluation.metrics import EndoVisMetric, endovis_metrics

KEY = "challenge_iou"
SITE_KEY = "site_challenge_iou"
REFERENCE_KEY = "reference_challenge_iou"
#: The key metric of a checkpoint whose reference score fell more than the tolerance: below every IoU (0..100).
FORGOT_THE_REFERENCE = -1.0


class SiteGuardMetric(EndoVisMetric):
    """:class:`EndoVisMetric` over the validation frames, split into site frames (the first ``site_frames``
    in validation order) and reference frames (the rest).

    ``compute`` returns ``{"challenge_iou": key score, "site_challenge_iou": s, "reference_challenge_iou": r}``
    (r only with reference frames). The key score is s while r >= the first computed r minus
    ``reference_tolerance`` (the first validation scores the served model), else :data:`FORGOT_THE_REFERENCE`.
    With ``site_frames`` None (or no reference frame) every frame is a site frame: the key score is the
    Challenge IoU of all frames, as :class:`EndoVisMetric` gives it.

    Args:
        site_frames: how many of the first validation frames are site frames (None: all).
        reference_tolerance: Challenge IoU points the reference score may fall below the served model's.
        (others as :class:`EndoVisMetric`)
    """

    def __init__(self, *args, site_frames: int | None = None, reference_tolerance: float = 1.0, **kwargs) -> None:
        self.site_frames = None if site_frames is None else int(site_frames)
        self.reference_tolerance = float(reference_tolerance)
        self.reference_baseline: float | None = None
        super().__init__(*args, **kwargs)

    def compute(self) -> dict[str, Any]:
        stats, has_entry = self.frame_statistics()
        split = stats.shape[0] if self.site_frames is None else min(self.site_frames, stats.shape[0])
        site = float(endovis_metrics(stats[:split], self.class_names, has_entry[:split])[KEY])
        result = {KEY: site, SITE_KEY: site}
        if split < stats.shape[0]:
            reference = float(endovis_metrics(stats[split:], self.class_names, has_entry[split:])[KEY])
            if self.reference_baseline is None:
                self.reference_baseline = reference
            result[REFERENCE_KEY] = reference
            if reference < self.reference_baseline - self.reference_tolerance:
                result[KEY] = FORGOT_THE_REFERENCE
        return result

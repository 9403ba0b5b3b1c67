"""Ground-truth annotations and tumour contours, one module per format (GeoJSON, ASAP XML) reading and writing it,
plus contour tracing from a mask (:mod:`~wsiseg.annotations.contours`), ground truth on an evaluation grid
(:mod:`~wsiseg.annotations.ground_truth`) and the polygon types they share (:mod:`~wsiseg.annotations.shapes`)."""

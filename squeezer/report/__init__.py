"""Reports: per-layer figures of a quantization (:mod:`.quant`), the report data of a run
(:mod:`.data`), its JSON form (:mod:`.json`) and its self-contained HTML page (:mod:`.html`)."""

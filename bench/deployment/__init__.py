"""The deployment benchmark behind ``python bench/deploy.py``, one job a module: the models and data (``tasks``),
the paths compared (``paths``: fp32 and squeezer's int8 configs; ``peers``: each runtime's own int8), their runners
and threads (``runtimes``), the guards around a build (``guards``), accuracy (``evaluate``), latency (``timing``),
the goals (``goals``), one model's run (``run``) and the document (``markdown``)."""

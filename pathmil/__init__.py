"""pathmil: whole-slide images to multiple-instance-learning models.

Stages (one sub-package each, dependencies pointing one way): ``slide`` (tissue and tiles),
``features`` (frozen encoders into bag files), ``data`` (bags and patient-level splits),
``models`` (MIL aggregators), ``tasks`` (classification, survival, regression), ``training``,
``evaluation``. The ``pathmil`` command (``cli.py``) exposes each stage; the Snakemake workflow wires them.
"""

__version__ = "0.1.0"

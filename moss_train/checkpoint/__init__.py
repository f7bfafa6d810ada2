"""Checkpoints: the training checkpoints, export to Hugging Face, import from HF CodeGen / MOSS, reward models.

- :mod:`moss_train.checkpoint.store`    the training checkpoints: atomic saves, checksums, free space, retention;
- :mod:`moss_train.checkpoint.sources`  read weights from a moss-train checkpoint (ZeRO shards
  consolidated by DeepSpeed's zero_to_fp32), an HF CodeGen directory or a MOSS directory;
- :mod:`moss_train.checkpoint.init`     `stage.init_from`: start any stage from those weights;
- :mod:`moss_train.checkpoint.export`   `moss-export`: a moss-train checkpoint -> an HF directory;
- :mod:`moss_train.checkpoint.chat_template`  the Jinja chat template of the MOSS turn format.
"""

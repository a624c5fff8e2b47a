"""Compression methods: the table-method registry (:mod:`.registry`, :mod:`.base`) and one module
per method (:mod:`.keep`, :mod:`.fp16`, :mod:`.rowwise`, :mod:`.tablewise`, :mod:`.robe`), the
per-table collections they fill (:mod:`.qat_embedding`, :mod:`.combined`), MLP quantization
(:mod:`.qat_linear`), and applying a plan (:mod:`.apply_plan`)."""

"""Convert a pretrained Wan2.1 T2V DiT (original release, diffusers pipeline or diffusers transformer folder) into a
uvigu model folder `DST/dit/` that `uvigu.checkpoint.load_pretrained` reads.

    python -m tools.convert_wan_weights --src SRC --dst DST [--parts ...] [--dtype float32|bfloat16|keep]
        [--overwrite] [--allow_nonfinite]

Modules: `safetensors_io` (a torch-free, memory-mapped safetensors reader / writer), `sources` (which kind of folder,
its config cross-checked with the tensors), `conversion` (the streaming conversion), `release` (every part of a
release), `staging` (DST lock, sweeping a killed run's staging, atomic no-replace publishing), `jsonfile` (JSON input
that fails with the file's name), `cli` (arguments, exit codes), `measure_peak_ram` (a script that measures the
converter's peak RSS on a synthetic checkpoint).
"""

from tools.convert_wan_weights.cli import main
from tools.convert_wan_weights.conversion import ConversionError, ConversionResult, convert
from tools.convert_wan_weights.sources import SourceError, detect_source

__all__ = ["ConversionError", "ConversionResult", "SourceError", "convert", "detect_source", "main"]

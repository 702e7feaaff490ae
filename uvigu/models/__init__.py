"""Model definitions: the Wan2.1 DiT (`wan`), its shared layers (`layers`) and the unified model (`univigu`)."""

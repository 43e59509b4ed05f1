"""ml_collections configs: each file defines `get_config(variant="")`; `variant="small"` is a quick local run."""

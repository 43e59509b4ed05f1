"""Private implementation modules of normjax; import from `normjax` instead."""

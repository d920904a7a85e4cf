"""Inference: frozen router schedules (`export`, `keys`), the fast sliced path (`fast`, `fast_blocks`,
`sliced`), checkpoint loading (`runs`), sampling (`sample`) and the PNG figures (`plots`)."""

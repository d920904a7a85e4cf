"""DyDiT mechanics, torch only: routers, masked execution, magnitude ranking, analytic FLOPs."""

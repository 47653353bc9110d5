"""What the apps' pages share: the htmx-aware request and renderer (`pages`) and SVG charts (`charts`)."""

"""The Gradio web UI: engine (models, adapters, rendering) apart from the page layout."""

"""The Gradio web UI. Arrows point down this list; only jobs.py knows the trainer.

    app.py        the layout (one function per tab) and the command line
    callbacks.py  the Gradio side of each handler: messages, updates, progress bar
    handlers.py   what each control does: plain functions of an AppState, no Gradio
    defaults.py   what suits the base: the forms' starting values, the Evaluate tab's scorer (toy or real)
    jobs.py       a training run in a background process (the trainer's arguments, progress, cancel)
    engine.py     the loaded model: base, adapter, strength, renders, uploads, cancel, one lock
    budget.py     a request's cost on the meta device, and the limits it must fit
    requests.py   what a user may ask for, checked before any work; path confinement
    browser.py    chromium driven by playwright (the screenshots and the browser test)
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home: set before gradio loads

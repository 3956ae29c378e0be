"""The Gradio side of each handler: the app's state bound, a UserError shown as a message
without server paths, plain return values turned into component updates, Gradio's
progress bar fed from the engine's steps. Each callback is a few lines; what it does
is in handlers.py.

Imported only by build_app: it imports gradio.
"""
from __future__ import annotations

import functools
import random

import gradio as gr

from ..errors import UserError
from . import handlers
from .handlers import AppState
from .requests import GenerateRequest, TrainRequest, scrub_paths


def _shown(method):
    """User mistakes become a message without server paths; anything else keeps its traceback in the log.

    functools.wraps keeps the signature, so Gradio still finds a gr.Progress parameter.
    """
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UserError as e:
            raise gr.Error(scrub_paths(str(e), self.state.adapters_dir)) from None
    return wrapped


def _reporter(progress):
    return lambda done, total: progress((done, total), desc="denoising")


class Callbacks:
    def __init__(self, state: AppState):
        self.state = state

    def refresh_picker(self):
        return gr.update(choices=handlers.picker_choices(self.state))

    def refresh_eval_list(self):
        return gr.update(choices=handlers.list_adapters(self.state.adapters_dir))

    def status(self) -> str:
        return handlers.status_line(self.state)

    @_shown
    def choose_base(self, base_id):
        picked, status = handlers.choose_base(self.state, base_id)
        return gr.update(value=picked), status

    @_shown
    def choose_adapter(self, name, allow_partial=False):
        return handlers.choose_adapter(self.state, name, allow_partial)

    @_shown
    def upload_adapter(self, file, allow_partial=False):
        name, status = handlers.upload_adapter(self.state, file, allow_partial)
        if name is None:
            return gr.update(), status
        return gr.update(choices=handlers.picker_choices(self.state), value=name), status

    @_shown
    def generate(self, prompt, negative, steps, guidance, seed, n, width, height, strength, progress=gr.Progress()):
        req = GenerateRequest(prompt, negative, steps, guidance, seed, n, width, height, strength)
        return handlers.generate(self.state, req, _reporter(progress))

    @_shown
    def compare(self, prompt, negative, steps, guidance, seed, n, width, height, strength, progress=gr.Progress()):
        req = GenerateRequest(prompt, negative, steps, guidance, seed, n, width, height, strength)
        return handlers.compare(self.state, req, _reporter(progress))

    def cancel_generation(self):
        return handlers.cancel_generation(self.state)

    @staticmethod
    def random_seed():
        return random.randrange(2 ** 32)

    @_shown
    def start_training(self, photos, folder, *settings):
        """settings: the Train tab's fields in TrainRequest's order (app.py lays them out so)."""
        return handlers.start_training(self.state, photos, folder, TrainRequest(*settings))

    @staticmethod
    def adapter_changed(adapter):
        return gr.update(visible=adapter == "loraplus")  # the LoRA+ ratio field

    @staticmethod
    def optimizer_changed(optimizer, learning_rate):
        learning_rate, note = handlers.optimizer_changed(optimizer, learning_rate)
        return learning_rate, note or handlers.optimizer_note()

    def training_status(self):
        return handlers.training_status(self.state)

    def cancel_training(self):
        return handlers.cancel_training(self.state)

    @_shown
    def run_evaluation(self, adapter_name, subject, class_name, prompts_text, num_images, steps, random_weights):
        return handlers.run_evaluation(self.state, adapter_name, subject, class_name, prompts_text, num_images,
                                       steps, random_weights)

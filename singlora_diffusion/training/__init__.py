"""The DreamBooth trainer, in importable phases: config -> build -> fit -> save."""

"""Only here to ship spectralmoe_peft_hint.pth next to the package (pyproject.toml holds all metadata)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "spectralmoe_peft_hint.pth"


class BuildPyWithPth(build_py):
    """Copy the .pth into the wheel's root, i.e. site-packages, where the interpreter runs it at start-up."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})

"""minis: Mini-Sequence Transformer for Hugging Face transformers, as an overlay package.

Besides the `minis` package, the wheel carries `minis.pth` at the root of site-packages: Python runs it at
start-up, and it installs the import hook that patches transformers' modeling code of the families listed in
`minis.families`.
The custom commands below put that file in place for regular (`pip install .`, `pip install git+URL`) and
editable (`pip install -e .`) installs.
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_NAME = "minis.pth"
PTH_SOURCE = os.path.join(HERE, "src", PTH_NAME)


class BuildPyWithPth(build_py):
    """Copies minis.pth next to the package, at the root of the wheel (that is, of site-packages)."""

    def run(self):
        super().run()
        shutil.copy(PTH_SOURCE, os.path.join(self.build_lib, PTH_NAME))


class EditableWheelWithPth(editable_wheel):
    """Editable installs get the same start-up file; it imports minis through the editable path finder."""

    def _create_wheel_file(self, bdist_wheel):
        wheel_path = super()._create_wheel_file(bdist_wheel)
        import zipfile

        with zipfile.ZipFile(wheel_path, "a") as wheel:
            wheel.write(PTH_SOURCE, PTH_NAME)
        _add_record_entry(wheel_path)
        return wheel_path


def _add_record_entry(wheel_path):
    """Re-signs the wheel's RECORD with the added start-up file (pip checks RECORD)."""
    import base64
    import hashlib
    import zipfile

    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        contents = {name: wheel.read(name) for name in names}
    record_name = next(name for name in names if name.endswith(".dist-info/RECORD"))
    data = contents[PTH_NAME]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = contents[record_name].decode()
    if f"\n{PTH_NAME}," not in "\n" + record:
        record += f"{PTH_NAME},sha256={digest},{len(data)}\n"
    contents[record_name] = record.encode()
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name in names:
            wheel.writestr(name, contents[name])


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

extras = {
    "test": ["pytest>=7", "tokenizers>=0.20", "accelerate>=1.0", "peft>=0.13", "trl>=0.20", "tqdm",
             "parameterized"],  # imported by transformers' common model tests (tests/test_upstream_common.py)
    "demo": ["accelerate>=1.1"],
    "plot": ["matplotlib>=3.7"],
    "flash": ["flash-attn>=2.6"],
    "deepspeed": ["deepspeed>=0.16"],
}
extras["dev"] = sorted({requirement for name in ("test", "plot") for requirement in extras[name]})

setup(
    name="minis",
    version="0.1.0",
    description="Mini-Sequence Transformer (MST) for Hugging Face transformers: long-context fine-tuning memory",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"minis": ["presets/*.json", "data/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=5.0,<6", "tokenizers>=0.20", "tqdm"],
    extras_require=extras,
    entry_points={"console_scripts": ["minis=minis.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    zip_safe=False,
)

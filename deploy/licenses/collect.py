"""Copy the licence texts of every installed Python distribution into DEST/python/.

Run inside the image build by the image's own Python; then removed. Also writes
DEST/python/LICENSES.txt (distribution, version, declared licence) and copies
Debian's Apache-2.0 and GPL-3 texts next to voxrelay's NOTICE.
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

NAMES = ("LICEN", "COPYING", "NOTICE", "AUTHORS")
#: What a distribution's metadata does not say and must be said.
KNOWN = {
    "espeakng-loader": "bundles libespeak-ng (eSpeak NG), GPL-3.0-or-later:"
    " see /usr/share/licenses/voxrelay/NOTICE and GPL-3",
}


def main(dest: Path) -> None:
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    lines = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        name = dist.metadata["Name"]
        declared = dist.metadata.get("License-Expression") or dist.metadata.get("License") or ""
        classifiers = [
            c.split(" :: ")[-1]
            for c in dist.metadata.get_all("Classifier") or []
            if c.startswith("License ::")
        ]
        declared = declared.splitlines()[0] if declared else ", ".join(classifiers)
        declared = KNOWN.get(name.lower(), declared)
        lines.append(f"{name} {dist.version}: {declared or 'see its files'}")
        for file in dist.files or []:
            source = Path(str(file.locate()))
            # RECORD may list files since removed (the build drops __pycache__).
            if file.name.upper().startswith(NAMES) and file.suffix != ".pyc" and source.is_file():
                target = python / name / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    (python / "LICENSES.txt").write_text("\n".join(lines) + "\n")
    common = Path("/usr/share/common-licenses")
    for text in ("Apache-2.0", "GPL-3"):
        shutil.copyfile(common / text, dest / "voxrelay" / text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

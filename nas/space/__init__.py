"""Search spaces (YAML data), concrete architectures and their encoding."""

from nas.space.arch import Arch, ArchFormatError, BlockSpec, decode
from nas.space.references import REFERENCE_NAMES, arch_from_text, reference
from nas.space.sampling import extreme, reference_archs, sample
from nas.space.schema import Space, SpaceError, list_spaces, load_space, require_space, space_from_dict

__all__ = [
    "REFERENCE_NAMES",
    "Arch",
    "ArchFormatError",
    "BlockSpec",
    "Space",
    "SpaceError",
    "arch_from_text",
    "decode",
    "extreme",
    "list_spaces",
    "load_space",
    "reference",
    "reference_archs",
    "require_space",
    "sample",
    "space_from_dict",
]

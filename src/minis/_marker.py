"""The attribute that marks a method as minis' replacement of an upstream one. Standard library only.

`minis.integration` (the MLP and causal-LM `forward`s, `_from_config`) and `minis.checkpoint_offload` (the
checkpointing switch) both mark what they install with it, and `unpatch` finds what to remove by it. It lives here
so that neither module has to import the other for it. The attribute holds the upstream method where the
replacement calls one, and None where the replacement overrides an inherited method.
"""

UPSTREAM_MARKER = "_minis_upstream"

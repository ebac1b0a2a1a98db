"""How a model family's components load: the loading half of `ModelSpec` (base.py), which every spec inherits.

`ComponentLoading` turns `--pretrained` plus the per-component overrides and dtypes (`ModelArgs`,
common/model_args.py) into configs, loaded modules, schedulers and pipelines, and refuses, with an error naming the
flag, a folder that is not of this family (`check_args`, `check_component_class`, a family's `check_pretrained`).
It also gives the stage-1 encoders' fingerprints: from their files when it can (fingerprint.py), else from the
loaded modules. Its methods read the family's class attributes (`component_classes`, `text_components`,
`scheduler_class`, `pipeline_class`, `display_name`, ...), which ModelSpec declares; a family overrides a method here
as it overrides any of ModelSpec's.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.dtypes import dtype_name, parse_dtype
from ft.common.errors import UserError
from ft.common.model_args import COMPONENTS, ModelArgs, is_processor

from .fingerprint import ComponentFiles, file_fingerprint, hub_hint, locate, module_fingerprint

if TYPE_CHECKING:
    import torch

    from .image import ImageConditioning


def import_class(module: str, name: str) -> type:
    """The class `name` of the module `module` (a spec names its classes as (module, class) pairs)."""
    return getattr(importlib.import_module(module), name)


def resolve_source(override: str, component: str) -> tuple[str, str | None]:
    """Where an override (`--vae-id X`) points: (path or repo id, subfolder or None). See common/model_args.py."""
    path = Path(override)
    if path.exists():
        if path.is_dir() and (path / component).is_dir():
            return str(path), component
        return str(path), None
    parts = override.split("/")
    if len(parts) > 2:  # owner/name/subfolder on the hub
        return "/".join(parts[:2]), "/".join(parts[2:])
    return override, None


class ComponentLoading:
    """The loading methods of a ModelSpec (its base class): where each component comes from, its config, the class
    checks, the loaded modules, the schedulers, the pipeline, and the encoders' fingerprints."""

    def check_args(self, args: ModelArgs) -> None:
        """Refuse overrides of components this family does not have (a flag that would silently do nothing), and
        what `check_pretrained` refuses of --pretrained: every command (precompute and check-data too) refuses a
        folder that a later stage would, before any work."""
        for component in COMPONENTS:
            if component in self.component_classes or component in self.image_component_classes:
                continue
            flag = "--" + component.replace("_", "-")
            if args.source_of(component):
                raise UserError(f"{flag}-id: {self.display_name} has no {component}; its components are "
                                f"{', '.join(self.component_classes)}.")
            if not is_processor(component) and parse_dtype(args.dtype_of(component)) != parse_dtype("bf16"):
                raise UserError(f"{flag}-dtype: {self.display_name} has no {component}.")
        if getattr(args, "expert", None) and not self.has_experts:
            raise UserError(f"--expert: {self.display_name} has one transformer, which trains on the whole schedule; "
                            "drop --expert (only Wan 2.2 A14B has two experts).")
        if getattr(args, "first_frame_conditioning_p", 0.0) and not self.first_frame_conditioning:
            raise UserError(f"--first-frame-conditioning-p: {self.display_name} is not trained with first-frame "
                            "conditioning; leave it at 0.")
        for flag in ("image_noise", "noised_image_dropout"):
            if getattr(args, flag, False) and not self.takes_image_noise:
                name = "--" + flag.replace("_", "-")
                raise UserError(f"{name}: ft's {self.display_name} training has no noised conditioning image; "
                                f"drop {name}.")
        if getattr(args, "pretrained", None):  # what a later stage would refuse of the folder, refused first
            self.check_pretrained(args.pretrained, args.revision, args.cache_dir)

    def component_class(self, component: str) -> type:
        return import_class(*{**self.component_classes, **self.image_component_classes}[component])

    def _source(self, component: str, args: ModelArgs) -> tuple[str, str | None, str | None]:
        override = args.source_of(component) if component in COMPONENTS else None
        if override:
            return (*resolve_source(override, component), None)
        root = Path(args.pretrained)
        if root.exists():
            if not root.is_dir():
                raise UserError(f"--pretrained {args.pretrained} is a file; pass a diffusers {self.display_name} "
                                "folder (with model_index.json) or a hub id.")
            if not (root / component).is_dir():
                have = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise UserError(
                    f"--pretrained {args.pretrained} has no {component}/ folder (it has: {', '.join(have) or 'none'}). "
                    f"Pass a diffusers {self.display_name} folder, or name the {component} with "
                    f"--{component.replace('_', '-')}-id.")
        return args.pretrained, component, args.revision

    def load_config(self, component: str, args: ModelArgs) -> dict[str, Any]:
        """A component's config.json only: cheap, no weights."""
        source, subfolder, revision = self._source(component, args)
        cls = self.component_class(component)
        try:
            config = dict(cls.load_config(source, subfolder=subfolder, revision=revision, cache_dir=args.cache_dir))
        except Exception as e:  # OSError, EnvironmentError, huggingface_hub errors
            raise UserError(f"could not read the {component} config from {source}"
                            f"{'/' + subfolder if subfolder else ''}: {e}{hub_hint(source)}") from e
        flag = f"--{component.replace('_', '-')}-id" if args.source_of(component) else "--pretrained"
        self.check_component_class(component, config, f"{source}{'/' + subfolder if subfolder else ''}", flag)
        return config

    def check_component_class(self, component: str, config: dict[str, Any], where: str, flag: str = "--pretrained"
                              ) -> None:
        """Refuse a transformer or VAE config whose `_class_name` is another class than this family's (another
        family's folder passed as --pretrained): diffusers would build this family's class from a config it does
        not fit, and fail deep inside, or not at all."""
        if component not in ("transformer", "vae") or component not in self.component_classes:
            return
        module, expected = self.component_classes[component]
        found = config.get("_class_name")
        if module != "diffusers" or not found or found == expected:
            return
        owner = family_of_class(component, found)
        owner = f" (a {owner} model: pass --model {owner})" if owner else ""
        raise UserError(f"{where}: this {component} is {found}{owner}, not the {expected} of "
                        f"{self.display_name}; pass a diffusers {self.display_name} "
                        f"{'folder' if flag == '--pretrained' else component} as {flag}.")

    def check_pretrained(self, pretrained: str, revision: str | None = None, cache_dir: str | None = None) -> None:
        """What this family refuses in --pretrained's model_index.json before any weight loads (`ft estimate`
        reads configs only); nothing by default."""
        return None

    def load_component(self, component: str, args: ModelArgs, device: str | torch.device | None = None) -> Any:
        """Load one component (`transformer`, `vae`, `text_encoder_2`, `tokenizer`, ...) in its configured dtype."""
        cls = self.component_class(component)
        source, subfolder, revision = self._source(component, args)
        kwargs: dict[str, Any] = {}
        hub: dict[str, Any] = {"cache_dir": args.cache_dir} if args.cache_dir else {}  # from_pretrained only
        dtype = None
        if not is_processor(component):
            if args.variant:
                hub["variant"] = args.variant
            dtype = parse_dtype(args.dtype_of(component), f"--{component.replace('_', '-')}-dtype")
            kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
        try:
            if source.endswith(".safetensors") and hasattr(cls, "from_single_file"):
                module = cls.from_single_file(source, **kwargs)
            else:
                if subfolder:
                    kwargs["subfolder"] = subfolder
                module = cls.from_pretrained(source, revision=revision, **kwargs, **hub)
        except Exception as e:  # from_pretrained raises OSError/ValueError/hub errors for a bad source
            where = f"{source}/{subfolder}" if subfolder else source
            raise UserError(f"could not load the {self.display_name} {component} from {where}: {e}"
                            f"{hub_hint(source)}") from e
        if device is not None and hasattr(module, "to"):
            module = module.to(device)
        if hasattr(module, "eval"):
            module.eval()
        return module

    def load_scheduler(self, args: ModelArgs) -> Any:
        cls = import_class(*self.scheduler_class)
        source, subfolder, revision = args.pretrained, "scheduler", args.revision
        try:
            return cls.from_pretrained(source, subfolder=subfolder, revision=revision, cache_dir=args.cache_dir)
        except Exception as e:
            raise UserError(f"could not load the scheduler from {source}/scheduler: {e}") from e

    def load_text_encoders(self, args: ModelArgs, device: str | torch.device) -> dict[str, Any]:
        """The tokenizers and text encoders, by component name."""
        return {name: self.load_component(name, args, device) for name in self.text_components}

    def load_image_encoders(self, args: ModelArgs, device: str | torch.device | None,
                            conditioning: ImageConditioning | None) -> dict[str, Any]:
        """The image encoder and its processor of an image-to-video checkpoint that has one, by component name ({}
        for any other run)."""
        if conditioning is None or not conditioning.image_encoder:
            return {}
        return {name: self.load_component(name, args, device) for name in self.image_component_classes}

    def load_pipeline(self, args: ModelArgs, device: str | torch.device,
                      conditioning: ImageConditioning | None = None) -> Any:
        """The diffusers pipeline with every component loaded through `load_component` (so overrides apply): the
        image-to-video pipeline, with its image encoder, for an image-conditioned run (`conditioning`)."""
        parts = {name: self.load_component(name, args, device) for name in self.component_classes}
        parts |= self.load_image_encoders(args, device, conditioning)
        parts["scheduler"] = self.pipeline_scheduler(args)
        return import_class(*(conditioning.pipeline_class if conditioning else self.pipeline_class))(**parts)

    def pipeline_scheduler(self, args: ModelArgs) -> Any:
        """The scheduler the pipeline samples with: the class named in the model's scheduler config."""
        config = import_class(*self.scheduler_class).load_config(args.pretrained, subfolder="scheduler",
                                                                 revision=args.revision, cache_dir=args.cache_dir)
        name = config.get("_class_name")
        if not name:
            return self.load_scheduler(args)
        return import_class("diffusers", name).from_config(config)

    def component_files(self, component: str, args: ModelArgs) -> ComponentFiles:
        """Where a component's files are on this machine (see fingerprint.py); FilesUnavailable if not readable."""
        source, subfolder, revision = self._source(component, args)
        return locate(source, subfolder, revision, args.cache_dir, args.variant, is_processor(component))

    def fingerprints_from_files(self, args: ModelArgs, components: tuple[str, ...] | None = None
                                ) -> dict[str, Any]:
        """The stage-1 encoders' fingerprints (text components and VAE) from their files, loading no model.
        Raises FilesUnavailable when some component cannot be read that way."""
        out = {}
        for name in components or (*self.text_components, "vae"):
            dtype = None if is_processor(name) else dtype_name(parse_dtype(args.dtype_of(name)))
            out[name] = file_fingerprint(self.component_class(name), self.component_files(name, args), dtype)
        return out

    def encoder_fingerprints(self, encoders: dict[str, Any], vae: Any, args: ModelArgs) -> dict[str, Any]:
        """The fallback of `fingerprints_from_files`: fingerprints of loaded modules."""
        return self.module_fingerprints({**encoders, "vae": vae}, args)

    def module_fingerprints(self, modules: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
        """Fingerprints of loaded components, by name, each in its configured dtype."""
        return {name: module_fingerprint(module, None if is_processor(name) else parse_dtype(args.dtype_of(name)))
                for name, module in modules.items()}


def family_of_class(component: str, class_name: str) -> str | None:
    """The family whose `component` (transformer, vae) is the diffusers class `class_name`, or None: asked of the
    families defined, ModelSpec's subclasses (every family's file is imported by registry.py, which a spec does not
    import). ModelSpec is this class's one subclass, so its subclasses are walked from here."""
    found, seen = [], list(ComponentLoading.__subclasses__())
    while seen:
        spec = seen.pop(0)
        seen += spec.__subclasses__()
        if getattr(spec, "name", None) and spec.component_classes.get(component, ("", ""))[1] == class_name:
            found.append(spec.name)
    return found[0] if found else None

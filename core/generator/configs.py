"""Hyperparameters of the conditional crystal VAE, as pydantic models, with the named presets.

``small`` trains on two CPU cores in a few minutes (tests, ``make demo``); ``paper`` follows the
reference work's scale (about 600 VAE epochs and 500 prior epochs) and wants a GPU. A config is
data: its settings hash goes into the model id, so a changed number means a new model.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.presets import Presets


class LossWeights(BaseModel):
    """Weights of the VAE loss terms (Con-CDVAE defaults) and the KL weight."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    natom: float = 1.0
    coord: float = 10.0
    type: float = 1.0
    lattice: float = 10.0
    composition: float = 1.0
    nelements: float = 1.0
    property: float = 3.0
    kl: float = 0.01


GeneratorProperty = Literal["k_vrh", "g_vrh"]
"""Moduli a generator can be conditioned on (GPa; the heads work in standardized log)."""


class CDVAEConfig(BaseModel):
    """Everything that defines a trained generator: architecture, noise schedule, training, sampling."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = "custom"
    # ---- architecture ----
    hidden: int = Field(64, ge=8, description="width of node, edge and MLP layers")
    latent_dim: int = Field(32, ge=2, description="size of the latent z")
    encoder_layers: int = Field(3, ge=1)
    denoiser_layers: int = Field(3, ge=1)
    n_freq: int = Field(8, ge=1, description="Fourier frequencies of fractional-coordinate differences")
    max_atoms: int = Field(20, ge=1, description="largest cell the model can decode; bigger cells are skipped")
    properties: tuple[GeneratorProperty, ...] = Field(
        ("k_vrh",),
        min_length=1,
        description="what the property head predicts and the prior is conditioned on, K_vrh first; a sample may "
        "be asked for any subset (a property not asked for is left free, as in training's condition dropout)",
    )
    # ---- noise ----
    sigma_max: float = Field(0.5, gt=0, description="largest wrapped-normal noise on fractional coordinates")
    sigma_min: float = Field(0.005, gt=0)
    n_noise_levels: int = Field(50, ge=2)
    # ---- training ----
    loss: LossWeights = LossWeights()
    vae_epochs: int = Field(60, ge=1)
    prior_epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    prior_lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    finetune_epochs: int = Field(40, ge=1, description="VAE epochs of a warm-started (fine-tuning) iteration")
    finetune_prior_epochs: int = Field(100, ge=1, description="prior epochs of a warm-started iteration")
    finetune_lr_scale: float = Field(0.5, gt=0, description="learning rates of a warm start, relative to lr/prior_lr")
    # ---- latent prior (conditional diffusion over z) ----
    prior_hidden: int = Field(128, ge=8)
    prior_layers: int = Field(3, ge=1)
    prior_steps: int = Field(100, ge=2, description="diffusion steps of the latent prior")
    prior_cond_dropout: float = Field(
        0.1, ge=0, lt=1, description="drop each property's condition during prior training (for guidance)"
    )
    prior_guidance: float = Field(
        2.0,
        ge=0,
        description="classifier-free guidance weight at sampling; 1 = plain (2 carries a sparse target K into the "
        "samples: CGCNN-graded MAPE 0.31 -> 0.25 at 350 GPa over three seeds, benchmarks/generator.py)",
    )
    prior_clip: float = Field(5.0, gt=0, description="clamp of the standardized clean-latent estimate while sampling")
    # ---- sampling ----
    corrector_steps: int = Field(3, ge=0, description="Langevin corrector steps per noise level")
    corrector_step: float = Field(0.5, gt=0, description="Langevin step as a fraction of sigma^2")
    repulsion_radius: float = Field(
        0.6, ge=0, description="after denoising, push apart atoms closer than this times (volume per atom)^(1/3)"
    )
    repulsion_steps: int = Field(50, ge=0, description="projection steps of the final repulsion; 0 turns it off")
    sample_batch: int = Field(512, ge=1, description="crystals decoded at once")
    min_elements: int = Field(
        2, ge=1, description="every sample has at least this many elements (2: alloys only; 1 allows single elements)"
    )
    symprec: float = Field(
        0.1, ge=0, description="Å: snap each decoded crystal to the space group spglib finds at this tolerance; 0 = off"
    )
    decoder: Literal["langevin", "template"] = Field(
        "template",
        description="where coordinates come from: annealed Langevin dynamics of the denoiser, or the site pattern "
        "of a nearby training crystal with the decoded composition (core.generator.templates)",
    )
    template_neighbours: int = Field(
        2, ge=1, description="template decoder: draw the template among this many nearest compatible ones in z"
    )
    max_draws: float = Field(
        1.5,
        ge=1,
        description="draw up to this many crystals per one returned, so that the samples of one target are distinct "
        "(StructureMatcher, as the uniqueness metric); 1 = return what is drawn, duplicates included",
    )

    @field_validator("properties")
    @classmethod
    def _k_first_once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """K_vrh is the head's first output (what ``score`` and keep-best read); each property once."""
        if value[0] != "k_vrh" or len(set(value)) != len(value):
            raise ValueError(f"properties must start with k_vrh and name each property once, got {list(value)}")
        return value

    SAMPLING: ClassVar[frozenset[str]] = frozenset(
        {
            "prior_guidance",
            "prior_clip",
            "corrector_steps",
            "corrector_step",
            "repulsion_radius",
            "repulsion_steps",
            "sample_batch",
            "min_elements",
            "symprec",
            "decoder",
            "template_neighbours",
            "max_draws",
        }
    )
    """Fields that only change how a trained model samples: a trained model may be resampled with others."""


PRESETS: Presets[CDVAEConfig] = Presets(
    "generator preset",
    {
        # a few minutes on 2 cores: the larger step trains faster; 200 VAE epochs, not 60, because the coordinate
        # denoiser is what puts samples near a minimum (true-lattice decoding matched 44 % of training crystals
        # after 60 epochs, 46 % after 200, 59 % with 3 corrector steps; P1 outputs 61 % -> 40 % -> 24 %)
        "small": CDVAEConfig(name="small", lr=2e-3, vae_epochs=200),
        # the same, conditioned on K and G: a design's G window (or G/K window) feeds it as well as its K window
        "small-kg": CDVAEConfig(name="small-kg", lr=2e-3, vae_epochs=200, properties=("k_vrh", "g_vrh")),
        "paper": CDVAEConfig(
            name="paper",
            hidden=256,
            latent_dim=256,
            encoder_layers=4,
            denoiser_layers=6,
            n_freq=32,
            vae_epochs=600,
            prior_epochs=500,
            batch_size=256,
            prior_hidden=512,
            prior_layers=4,
            prior_steps=200,
            sample_batch=2048,
        ),
    },
)


PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
"""The named generator presets, as a type: a form shows them as choices."""

"""citylib: what makes a city look like itself?

Train CNNs to recognise cities from street-level images, explain them with Grad-CAM,
and measure which objects each city's network attends to. The notebooks under
``notebooks/`` call into this package; all logic lives here.

The stages, in the order a job runs them, and the notebook that shows each. A stage is a
module whose entry point is ``run(cfg, out, *inputs, **options)`` (``build`` for the
counterfactuals): its settings, the folder it writes (its result's ``folder``), what it reads,
then keyword-only options such as ``progress``; its result is keyed by what made it
(``artifacts``).

  synth         a generated world of cities, every pixel labelled            (before 01)
  counterfactual  its test scenes re-rendered with one planted cue reset      (01)
  data          find, check and split the images; the decoded-image cache     (01: cache)
  train         one architecture, one seed                                     (02)
  gradcam       the weighted masks of every test image, with the sanity checks (03)
  embed         PCA -> t-SNE / UMAP map of the masks, kNN agreement           (04)
  segment       an ADE20K label map for every image                            (05)
  objects       R, coverage and lift per city and object (Eq. 1)               (05)
  causal        how much each network relies on each planted cue               (05)
  methods       which CAM method, at which layer, shows that reliance          (05)
  compare       architectures vs initialisations: AR (Eq. 2), Table 2          (06)

  streetview    real images: collect (the stage, ``citylib streetview``), static_api (the
                key, rate limit, retries, budget), geosample (seeded points in a city's area)

  pipeline      one run's stages chained as the notebooks call them
  runner        papermill over the notebooks for every parameter file; cli, report

Helpers (no I/O of their own unless named): saliency (the CAM methods and the mask maths),
sanity (cascade and deletion checks), stats (histograms behind R and lift), cues (planted-cue
recovery), intervals (Wilson and bootstrap intervals), models (the architecture registry),
scene (drawing primitives), splits, imagecache (decoded, resized images on disk), ade20k
(ADE20K's classes), config and params (strict settings), artifacts (atomic writes, result keys),
paths, predict.

Presentation: plots, gradcam_plots, stats_plots, compare_plots, gallery (figures, each
function returns or saves a figure) and widgets (the JupyterLab panels).
"""

__version__ = "0.1.0"

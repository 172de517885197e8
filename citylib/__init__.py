"""citylib: what makes a city look like itself?

Train CNNs to recognise cities from street-level images, explain them with Grad-CAM, and
measure which objects each city's network attends to and relies on. The notebooks under
``notebooks/`` call into this package; all logic lives here, in sub-packages by concern, each
importing only from those listed before it:

  core      strict settings (config), results keyed by what made them (artifacts), paths,
            devices, DDP (distributed), ADE20K's classes
  stats     histograms of mask values (R, coverage, lift: the paper's Eq. 1), intervals,
            resampling (the bootstrap, permutations and sign flips, written once)
  world     the generated world: scene (drawing), street (a spot's layout), worldfile (cities
            as styles), synth (``citylib synth``)
  data      dataset (the data stage and its snapshot), inventory (finding and checking files),
            imagecache (the image store), splits, segment (label maps), counterfactual
            (re-rendered test streets), streetview (collecting real images)
  nets      models (the architecture registry), train (the loop), checkpoint, infer, loader
  explain   saliency (mask maths), cams (one file per CAM method), sanity, cues
  stages    gradcam, embed, objects, causal, methods, compare (with residuals, ar_tables):
            each ``run`` computes, writes and reuses its result; none draws
  figures   every plot, gallery and widget; each stage's figure function (``draw``)
  run       table (the ordered stage table everything is derived from), params, pipeline,
            runner (with notebooks, schedule, processes), summary, report, cli, predict
"""

__version__ = "0.1.0"

-- 0016: calibrated yes/no decisions. A decision rule (threshold, optionally a probability calibration)
-- is fitted on held-out reviewed / gold labels, per fine-tuned model version (by `finetune`, on the
-- version's held-out evaluation run) or per base model and dataset (by `qwen-tasks calibrate`). Labelling
-- with that model decides cry `score` answers with it, and each answer records the rule it was decided
-- with (cry_answer.calibration_id, p_calibrated); the raw p_yes stays as the model gave it.
-- depends: 0010_current_label

CREATE TABLE decision_calibration (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task              text NOT NULL DEFAULT 'cry' CHECK (task = 'cry'),
    -- what it belongs to: a fine-tuned version, or a base model (+ revision) on one dataset / on all
    model_version_id  bigint REFERENCES model_version (id) ON DELETE CASCADE,
    model             text NOT NULL,       -- base model (hub id or resolved path)
    revision          text NOT NULL DEFAULT '',
    dataset_id        bigint REFERENCES dataset (id) ON DELETE CASCADE,  -- NULL: every dataset
    -- the prompt whose p_yes it was fitted on (label_run.prompt_template: the text sent, the same for
    -- --method score and both): p_yes depends on the question, so a rule only decides runs sending the
    -- same prompt (a version asked another question gets that question's rule)
    prompt_template   text NOT NULL,
    method            text NOT NULL CHECK (method IN ('none', 'platt', 'isotonic')),
    -- platt: {"a", "b"} of sigmoid(a * logit(p_yes) + b); isotonic: {"x": [...], "y": [...]} knots,
    -- linear in between and clipped outside; none: {}
    params            jsonb NOT NULL DEFAULT '{}'::jsonb,
    threshold         double precision NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    objective         text NOT NULL,       -- 'max_f1' or 'precision>=P' (the one reached)
    target_precision  double precision CHECK (target_precision > 0 AND target_precision <= 1),
    n_labels          integer NOT NULL CHECK (n_labels > 0),
    n_yes             integer NOT NULL CHECK (n_yes >= 0),
    source_run_id     bigint REFERENCES label_run (id) ON DELETE SET NULL,  -- the run whose p_yes it was fit on
    heldout           jsonb NOT NULL DEFAULT '{}'::jsonb,  -- figures on the labels it was fit on
    note              text,                -- e.g. why the target precision was not used
    chosen_at         timestamptz NOT NULL DEFAULT now()
);
-- the newest row of a key is the one labelling uses
CREATE INDEX decision_calibration_version ON decision_calibration (model_version_id, md5(prompt_template), id DESC)
    WHERE model_version_id IS NOT NULL;
CREATE INDEX decision_calibration_base ON decision_calibration (model, revision, md5(prompt_template), dataset_id, id DESC)
    WHERE model_version_id IS NULL;

ALTER TABLE cry_answer
    ADD COLUMN calibration_id bigint REFERENCES decision_calibration (id) ON DELETE SET NULL,
    ADD COLUMN p_calibrated double precision CHECK (p_calibrated >= 0 AND p_calibrated <= 1);

-- The terraform CLI's http state backend (docs/terraform-cli.md): a state version may now be
-- written by the CLI instead of a deploy.
--
-- state_versions.source says which: 'deploy' (deploy_id and attempt name the run that persisted
-- it, as before) or 'cli' (no deploy; written_by names the user whose terraform wrote it). Every
-- existing row was persisted by a deploy and keeps its values.
ALTER TABLE state_versions
    ALTER COLUMN deploy_id DROP NOT NULL,
    ALTER COLUMN attempt DROP NOT NULL,
    ADD COLUMN source text NOT NULL DEFAULT 'deploy',
    ADD COLUMN written_by text,
    ADD CONSTRAINT state_versions_source CHECK (
        (source = 'deploy' AND deploy_id IS NOT NULL AND attempt IS NOT NULL)
        OR (source = 'cli' AND deploy_id IS NULL AND written_by IS NOT NULL)
    );


-- Saved plans (migration 0010): a plan a person may approve, sealed with the key ring.

-- insert_saved_plan --
-- Keep a plan file (sealed) for the deploy's attempt, before its Planned event is appended.
INSERT INTO saved_plans (id, deploy_id, attempt, sha256, size, content, lock_file,
                         base_state_version)
VALUES (%(id)s, %(deploy_id)s, %(attempt)s, %(sha256)s, %(size)s, %(content)s, %(lock_file)s,
        %(base_state_version)s);

-- get_saved_plan --
-- One saved plan (sealed), by id and deploy.
SELECT id, deploy_id, attempt, sha256, size, content, lock_file, base_state_version
FROM saved_plans WHERE id = %(id)s AND deploy_id = %(deploy_id)s;

-- delete_saved_plans --
-- Forget a deploy's saved plans once it has ended (they hold variable values).
DELETE FROM saved_plans WHERE deploy_id = %(deploy_id)s;

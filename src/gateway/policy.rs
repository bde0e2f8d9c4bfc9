//! Per-user statement policy: a read-only user runs only reads. (Which networks a user may
//! log in from is checked when it logs in, in `authenticate`.)
//!
//! The gateway's check is the first of two: read-only users' queries also carry `readonly`
//! upstream, so a statement the gateway cannot look into (`Statement::Unknown`) or
//! misjudges still meets the server's own guard.

use super::error::GatewayError;
use super::sql::Statement;
use super::users::User;

/// Whether `user` may run `statement`.
pub fn allows(user: &User, statement: Statement) -> Result<(), GatewayError> {
    if user.readonly && statement == Statement::Write {
        return Err(GatewayError::ReadOnly {
            user: user.name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::users::tests::test_user;

    #[test]
    fn read_only_users_run_reads_and_what_the_server_guards() {
        let bi = test_user("bi", true);
        assert!(allows(&bi, Statement::Read).is_ok());
        assert!(matches!(
            allows(&bi, Statement::Write),
            Err(GatewayError::ReadOnly { .. })
        ));
        assert!(allows(&bi, Statement::Unknown).is_ok());
        let etl = test_user("etl", false);
        assert!(allows(&etl, Statement::Write).is_ok());
    }
}

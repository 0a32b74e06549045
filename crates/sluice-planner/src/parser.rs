//! Parses a Sluice SQL script into statements.
//!
//! Sluice's own statements (`CREATE SOURCE`, `CREATE SINK`, `SET`,
//! `EXPLAIN` of those) are parsed here on top of `sqlparser`; everything
//! else (queries, `CREATE EXTERNAL TABLE`, `INSERT`) by DataFusion's parser.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{DFSchema, ScalarValue, TableReference};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    AggregateUDF, Expr, HigherOrderUDF, ScalarUDF, TableSource, WindowUDF, planner::ContextProvider,
};
use datafusion::sql::parser::{DFParser, DFParserBuilder, Statement as DFStatement};
use datafusion::sql::planner::{PlannerContext, SqlToRel};
use datafusion::sql::sqlparser::ast::{self, Query, SetExpr};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use sluice_common::{Error, Options, Result};

/// An event-time watermark declaration: `WATERMARK FOR ts AS ts - INTERVAL ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkDef {
    /// The event-time column.
    pub column: String,
    /// How far behind the largest event time seen the watermark trails.
    pub delay: Duration,
    /// After this much processing time without new rows, the source no
    /// longer holds the query's watermark back (`idle_timeout` option).
    pub idle_timeout: Option<Duration>,
}

/// `CREATE SOURCE name (columns) WITH (options)`.
#[derive(Debug, Clone)]
pub struct CreateSource {
    /// The source's name.
    pub name: String,
    /// The declared columns, if any.
    pub schema: Option<SchemaRef>,
    /// The watermark declaration, if any.
    pub watermark: Option<WatermarkDef>,
    /// Where late rows go (`late_rows = '<sink or table>'`), if anywhere.
    pub late_rows: Option<String>,
    /// The `WITH (...)` options.
    pub options: Options,
}

/// `CREATE SINK name WITH (options) [AS query]`.
#[derive(Debug, Clone)]
pub struct CreateSink {
    /// The sink's name.
    pub name: String,
    /// The `WITH (...)` options.
    pub options: Options,
    /// The query feeding it, when given with `AS`.
    pub query: Option<Box<Query>>,
}

/// One statement of a Sluice script.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `CREATE SOURCE ...`
    CreateSource(CreateSource),
    /// `CREATE SINK ...`
    CreateSink(CreateSink),
    /// `INSERT INTO target <query>`: into a sink starts a streaming query;
    /// into a memory source appends rows.
    InsertInto {
        /// The target's name.
        target: String,
        /// The rows or query.
        query: Box<Query>,
    },
    /// `SET key = value`.
    Set {
        /// The setting, lower-cased.
        key: String,
        /// Its value.
        value: String,
    },
    /// `EXPLAIN <statement>`.
    Explain(Box<Statement>),
    /// Anything DataFusion handles itself (queries, `CREATE EXTERNAL TABLE`, ...).
    DataFusion(Box<DFStatement>),
}

/// Parses every statement of `sql`.
pub fn parse_script(sql: &str) -> Result<Vec<Statement>> {
    let dialect = GenericDialect {};
    let sql = rewrite_version_as_of(sql);
    let mut p = DFParserBuilder::new(sql.as_str())
        .with_dialect(&dialect)
        .build()
        .map_err(|e| Error::plan(df_message(&e)))?;
    let mut out = Vec::new();
    loop {
        while p.parser.consume_token(&Token::SemiColon) {}
        if p.parser.peek_token().token == Token::EOF {
            break;
        }
        out.push(parse_statement(&mut p)?);
        let next = p.parser.peek_token();
        if next.token != Token::SemiColon && next.token != Token::EOF {
            return Err(Error::plan(format!(
                "expected ';' or the end of the script, found '{}' at {}",
                next.token, next.span.start
            )));
        }
    }
    Ok(out)
}

/// `state('q') VERSION AS OF 42` becomes `state('q', 42)`: the generic
/// dialect has no table versioning, and `state` is a table function.
fn rewrite_version_as_of(sql: &str) -> String {
    // Tokens keep their text as written (no unescaping), so a rebuilt
    // script says exactly what the original said.
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql)
        .with_unescape(false)
        .tokenize()
    else {
        // Let the parser report the error on the original text.
        return sql.to_string();
    };
    let solid: Vec<usize> = (0..tokens.len())
        .filter(|&i| !matches!(tokens[i], Token::Whitespace(_)))
        .collect();
    let mut out = tokens.clone();
    let mut edits: Vec<(usize, usize, usize, String)> = Vec::new(); // (rparen, first, last, n)
    for w in 0..solid.len() {
        let at = |k: usize| solid.get(w + k).map(|&i| &tokens[i]);
        let (Some(v), Some(a), Some(o), Some(Token::Number(n, _))) = (at(0), at(1), at(2), at(3))
        else {
            continue;
        };
        if !(word_is(v, "VERSION") && word_is(a, "AS") && word_is(o, "OF")) || w == 0 {
            continue;
        }
        let r = solid[w - 1];
        if tokens[r] != Token::RParen {
            continue;
        }
        let mut depth = 0i32;
        let mut l = None;
        for k in (0..w).rev() {
            match tokens[solid[k]] {
                Token::RParen => depth += 1,
                Token::LParen => {
                    depth -= 1;
                    if depth == 0 {
                        l = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        if let Some(l) = l
            && l > 0
            && word_is(&tokens[solid[l - 1]], "state")
        {
            edits.push((r, solid[w], solid[w + 3], n.clone()));
        }
    }
    if edits.is_empty() {
        return sql.to_string();
    }
    for (r, first, last, n) in edits.into_iter().rev() {
        for t in &mut out[first..=last] {
            *t = Token::Whitespace(datafusion::sql::sqlparser::tokenizer::Whitespace::Space);
        }
        out.insert(r, Token::make_word(&format!(", {n}"), None));
    }
    out.iter().map(|t| t.to_string()).collect()
}

fn word_is(t: &Token, w: &str) -> bool {
    matches!(t, Token::Word(word) if word.value.eq_ignore_ascii_case(w) && word.quote_style.is_none())
}

fn parse_statement(p: &mut DFParser<'_>) -> Result<Statement> {
    let t0 = p.parser.peek_nth_token(0).token;
    let t1 = p.parser.peek_nth_token(1).token;
    if word_is(&t0, "EXPLAIN") {
        p.parser.next_token();
        return Ok(Statement::Explain(Box::new(parse_statement(p)?)));
    }
    if word_is(&t0, "CREATE") && word_is(&t1, "SOURCE") {
        p.parser.next_token();
        p.parser.next_token();
        return parse_create_source(p).map(Statement::CreateSource);
    }
    if word_is(&t0, "CREATE") && word_is(&t1, "SINK") {
        p.parser.next_token();
        p.parser.next_token();
        return parse_create_sink(p).map(Statement::CreateSink);
    }
    if word_is(&t0, "SET") {
        p.parser.next_token();
        return parse_set(p);
    }
    let mut stmt = p
        .parse_statement()
        .map_err(|e| Error::plan(df_message(&e)))?;
    if let DFStatement::Statement(s) = &mut stmt
        && let ast::Statement::Query(q) = s.as_mut()
    {
        crate::windows::rewrite_windows(q)?;
    }
    if let DFStatement::Statement(s) = &stmt
        && let ast::Statement::Insert(insert) = s.as_ref()
    {
        let target = match &insert.table {
            ast::TableObject::TableName(n) => object_name(n),
            other => return Err(Error::plan(format!("cannot INSERT INTO {other}"))),
        };
        let mut query = insert
            .source
            .clone()
            .ok_or_else(|| Error::plan(format!("INSERT INTO {target} needs VALUES or a SELECT")))?;
        crate::windows::rewrite_windows(&mut query)?;
        if !insert.columns.is_empty() {
            return Err(Error::not_supported(format!(
                "a column list in INSERT INTO {target} (...): give every column in order"
            )));
        }
        return Ok(Statement::InsertInto { target, query });
    }
    Ok(Statement::DataFusion(Box::new(stmt)))
}

fn parse_create_source(p: &mut DFParser<'_>) -> Result<CreateSource> {
    let parser = &mut p.parser;
    let name = object_name(&parser.parse_object_name(false).map_err(parse_error)?);
    let mut columns = Vec::new();
    let mut watermark_sql = None;
    if parser.consume_token(&Token::LParen) {
        loop {
            if word_is(&parser.peek_token().token, "WATERMARK") {
                parser.next_token();
                expect_word(parser, "FOR")?;
                let col = parser.parse_identifier().map_err(parse_error)?;
                expect_word(parser, "AS")?;
                let expr = parser.parse_expr().map_err(parse_error)?;
                watermark_sql = Some((col.value, expr));
            } else {
                columns.push(parser.parse_column_def().map_err(parse_error)?);
            }
            if parser.consume_token(&Token::Comma) {
                continue;
            }
            parser.expect_token(&Token::RParen).map_err(parse_error)?;
            break;
        }
    }
    let owner = format!("source '{name}'");
    let mut options = parse_with_options(p, &owner)?;
    let idle_timeout = options.get_duration("idle_timeout")?;
    options.remove("idle_timeout");
    let late_rows = options.remove("late_rows");
    let provider = NoTables::default();
    let planner = SqlToRel::new(&provider);
    let schema = if columns.is_empty() {
        None
    } else {
        let s = planner
            .build_schema(columns)
            .map_err(|e| Error::plan(format!("{owner}: {}", df_message(&e))))?;
        Some(Arc::new(s))
    };
    let watermark = match watermark_sql {
        None if idle_timeout.is_some() => {
            return Err(Error::plan(format!(
                "{owner}: idle_timeout applies to a watermark; declare one with WATERMARK FOR <column> AS ..."
            )));
        }
        None => None,
        Some((col, expr)) => Some(WatermarkDef {
            idle_timeout,
            ..watermark_def(&planner, &owner, schema.as_ref(), &col, expr)?
        }),
    };
    if late_rows.is_some() && watermark.is_none() {
        return Err(Error::plan(format!(
            "{owner}: late_rows needs a watermark (rows are late against it); declare one with WATERMARK FOR <column> AS ..."
        )));
    }
    Ok(CreateSource {
        name,
        schema,
        watermark,
        late_rows,
        options,
    })
}

fn watermark_def(
    planner: &SqlToRel<'_, NoTables>,
    owner: &str,
    schema: Option<&SchemaRef>,
    col: &str,
    expr: ast::Expr,
) -> Result<WatermarkDef> {
    let schema = schema.ok_or_else(|| {
        Error::plan(format!(
            "{owner}: a WATERMARK needs the columns to be declared"
        ))
    })?;
    let field = schema
        .fields()
        .iter()
        .find(|f| f.name().eq_ignore_ascii_case(col))
        .ok_or_else(|| Error::plan(format!("{owner}: WATERMARK FOR {col}: no such column")))?;
    if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
        return Err(Error::plan(format!(
            "{owner}: WATERMARK FOR {col}: the column is {}, it must be a TIMESTAMP",
            field.data_type()
        )));
    }
    let df_schema = DFSchema::try_from(Schema::clone(schema)).map_err(Error::from)?;
    let shown = expr.to_string();
    let planned = planner
        .sql_to_expr(expr, &df_schema, &mut PlannerContext::new())
        .map_err(|e| {
            Error::plan(format!(
                "{owner}: WATERMARK expression '{shown}': {}",
                df_message(&e)
            ))
        })?;
    let bad = || {
        Error::plan(format!(
            "{owner}: WATERMARK FOR {col} AS '{shown}': expected '{col}' or '{col} - INTERVAL ...'"
        ))
    };
    let delay = match planned {
        Expr::Column(c) if c.name.eq_ignore_ascii_case(col) => Duration::ZERO,
        Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Minus => {
            match (*b.left, *b.right) {
                (Expr::Column(c), Expr::Literal(v, _)) if c.name.eq_ignore_ascii_case(col) => {
                    interval_duration(&v).ok_or_else(bad)?
                }
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    Ok(WatermarkDef {
        column: field.name().clone(),
        delay,
        idle_timeout: None,
    })
}

/// A fixed-length interval as a duration (months have no fixed length).
fn interval_duration(v: &ScalarValue) -> Option<Duration> {
    let nanos: i128 = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            i.days as i128 * 86_400_000_000_000 + i.nanoseconds as i128
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            i.days as i128 * 86_400_000_000_000 + i.milliseconds as i128 * 1_000_000
        }
        _ => return None,
    };
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

fn parse_create_sink(p: &mut DFParser<'_>) -> Result<CreateSink> {
    let name = object_name(&p.parser.parse_object_name(false).map_err(parse_error)?);
    let options = parse_with_options(p, &format!("sink '{name}'"))?;
    let query = if word_is(&p.parser.peek_token().token, "AS") {
        p.parser.next_token();
        let mut q = p.parser.parse_query().map_err(parse_error)?;
        crate::windows::rewrite_windows(&mut q)?;
        Some(q)
    } else {
        None
    };
    Ok(CreateSink {
        name,
        options,
        query,
    })
}

fn parse_with_options(p: &mut DFParser<'_>, owner: &str) -> Result<Options> {
    let mut options = Options::new(owner);
    let parser = &mut p.parser;
    if !word_is(&parser.peek_token().token, "WITH") {
        return Ok(options);
    }
    parser.next_token();
    parser.expect_token(&Token::LParen).map_err(parse_error)?;
    if parser.consume_token(&Token::RParen) {
        return Ok(options);
    }
    loop {
        let mut key = option_word(parser)?;
        while parser.consume_token(&Token::Period) {
            key = format!("{key}.{}", option_word(parser)?);
        }
        parser.expect_token(&Token::Eq).map_err(parse_error)?;
        let value = option_word(parser)?;
        if options.get(&key).is_some() {
            return Err(Error::plan(format!(
                "{owner}: option '{key}' is given twice"
            )));
        }
        options.set(&key, value);
        if parser.consume_token(&Token::Comma) {
            continue;
        }
        parser.expect_token(&Token::RParen).map_err(parse_error)?;
        return Ok(options);
    }
}

fn option_word(parser: &mut datafusion::sql::sqlparser::parser::Parser<'_>) -> Result<String> {
    let t = parser.next_token();
    match &t.token {
        Token::Word(w) => Ok(w.value.clone()),
        Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => Ok(s.clone()),
        Token::Number(n, _) => Ok(n.clone()),
        Token::Minus => match parser.next_token().token {
            Token::Number(n, _) => Ok(format!("-{n}")),
            other => Err(Error::plan(format!(
                "expected a number after '-', found '{other}'"
            ))),
        },
        other => Err(Error::plan(format!(
            "expected an option name or value, found '{other}' at {}",
            t.span.start
        ))),
    }
}

fn parse_set(p: &mut DFParser<'_>) -> Result<Statement> {
    let parser = &mut p.parser;
    let mut key = option_word(parser)?;
    while parser.consume_token(&Token::Period) {
        key = format!("{key}.{}", option_word(parser)?);
    }
    if !parser.consume_token(&Token::Eq) && !word_is(&parser.next_token().token, "TO") {
        return Err(Error::plan(format!("SET {key}: expected '=' or TO")));
    }
    let value = option_word(parser)?;
    Ok(Statement::Set {
        key: key.to_ascii_lowercase(),
        value,
    })
}

fn expect_word(parser: &mut datafusion::sql::sqlparser::parser::Parser<'_>, w: &str) -> Result<()> {
    let t = parser.next_token();
    if word_is(&t.token, w) {
        Ok(())
    } else {
        Err(Error::plan(format!(
            "expected {w}, found '{}' at {}",
            t.token, t.span.start
        )))
    }
}

/// The name an object name refers to (unquoted parts lower-cased, as
/// DataFusion normalizes identifiers).
pub fn object_name(n: &ast::ObjectName) -> String {
    n.0.iter()
        .map(|part| match part.as_ident() {
            Some(id) if id.quote_style.is_some() => id.value.clone(),
            Some(id) => id.value.to_ascii_lowercase(),
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether a query is a plain `VALUES (...)` list.
pub fn is_values(q: &Query) -> bool {
    matches!(q.body.as_ref(), SetExpr::Values(_))
}

fn parse_error(e: ParserError) -> Error {
    Error::plan(
        e.to_string()
            .trim_start_matches("sql parser error: ")
            .to_string(),
    )
}

fn df_message(e: &DataFusionError) -> String {
    let s = e.find_root().to_string();
    let s = s.lines().next().unwrap_or_default();
    for prefix in [
        "Error during planning: ",
        "SQL error: ",
        "This feature is not implemented: ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    s.to_string()
}

/// A context provider that knows no tables or functions: enough to turn
/// column definitions and interval literals into Arrow types and values.
#[derive(Default)]
struct NoTables {
    options: ConfigOptions,
}

impl ContextProvider for NoTables {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion::common::Result<Arc<dyn TableSource>> {
        Err(DataFusionError::Plan(format!("no table {name} here")))
    }
    fn get_function_meta(&self, _: &str) -> Option<Arc<ScalarUDF>> {
        None
    }
    fn get_higher_order_meta(&self, _: &str) -> Option<Arc<HigherOrderUDF>> {
        None
    }
    fn get_aggregate_meta(&self, _: &str) -> Option<Arc<AggregateUDF>> {
        None
    }
    fn get_window_meta(&self, _: &str) -> Option<Arc<WindowUDF>> {
        None
    }
    fn get_variable_type(&self, _: &[String]) -> Option<DataType> {
        None
    }
    fn options(&self) -> &ConfigOptions {
        &self.options
    }
    fn udf_names(&self) -> Vec<String> {
        vec![]
    }
    fn higher_order_function_names(&self) -> Vec<String> {
        vec![]
    }
    fn udaf_names(&self) -> Vec<String> {
        vec![]
    }
    fn udwf_names(&self) -> Vec<String> {
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_of_every_statement_kind_parses() {
        let stmts = parse_script(
            "CREATE SOURCE bids (auction BIGINT, price BIGINT NOT NULL, ts TIMESTAMP,
                 WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
             WITH (connector = 'file', 'bootstrap.servers' = '127.0.0.1:9092', format = json, max_files_per_trigger = 2);
             SET trigger = '5s';
             CREATE SINK out WITH (connector = 'memory') AS SELECT auction, price * 2 AS p FROM bids WHERE price > 10;
             CREATE SINK later WITH (connector = 'memory');
             INSERT INTO later SELECT * FROM bids;
             EXPLAIN CREATE SINK x WITH (connector = 'console') AS SELECT 1;
             SELECT 1;",
        )
        .unwrap();
        assert_eq!(stmts.len(), 7);
        let Statement::CreateSource(s) = &stmts[0] else {
            panic!("{:?}", stmts[0])
        };
        assert_eq!(s.name, "bids");
        assert_eq!(s.schema.as_ref().unwrap().fields().len(), 3);
        assert!(!s.schema.as_ref().unwrap().field(1).is_nullable());
        assert_eq!(
            s.watermark,
            Some(WatermarkDef {
                column: "ts".into(),
                delay: Duration::from_secs(5),
                idle_timeout: None,
            })
        );
        assert_eq!(s.options.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(s.options.get("format"), Some("json"));
        assert!(
            matches!(&stmts[1], Statement::Set { key, value } if key == "trigger" && value == "5s")
        );
        assert!(matches!(
            &stmts[2],
            Statement::CreateSink(CreateSink { query: Some(_), .. })
        ));
        assert!(matches!(
            &stmts[3],
            Statement::CreateSink(CreateSink { query: None, .. })
        ));
        assert!(matches!(&stmts[4], Statement::InsertInto { target, .. } if target == "later"));
        assert!(matches!(&stmts[5], Statement::Explain(_)));
        assert!(matches!(&stmts[6], Statement::DataFusion(_)));
    }

    #[test]
    fn version_as_of_on_state_becomes_an_argument() {
        let got = rewrite_version_as_of("SELECT * FROM state('q') VERSION AS OF 42 WHERE x = 1");
        let words: Vec<&str> = got.split_whitespace().collect();
        assert_eq!(words.join(" "), "SELECT * FROM state('q', 42) WHERE x = 1");
        let other = "SELECT version AS of FROM t";
        assert_eq!(rewrite_version_as_of(other), other);
        // Escaped quotes survive, with or without a rewrite.
        let quoted = "SELECT 'O''Brien', \"a\"\"b\" FROM state('q') VERSION AS OF 1";
        let got = rewrite_version_as_of(quoted);
        assert!(
            got.contains("'O''Brien'") && got.contains("\"a\"\"b\""),
            "{got}"
        );
        assert_eq!(rewrite_version_as_of("SELECT 'it''s'"), "SELECT 'it''s'");
    }

    #[test]
    fn bad_statements_give_errors_not_panics() {
        for sql in [
            "CREATE SOURCE",
            "CREATE SOURCE s (a BIGINT, WATERMARK FOR a AS a - INTERVAL '1' SECOND) WITH (connector='memory')",
            "CREATE SOURCE s (ts TIMESTAMP, WATERMARK FOR ts AS ts + INTERVAL '1' SECOND)",
            "CREATE SOURCE s (ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' MONTH)",
            "CREATE SOURCE s (a BIGINT) WITH (connector = 'memory', connector = 'file')",
            "CREATE SINK k WITH (connector 'memory')",
            "CREATE SOURCE s (a NOSUCHTYPE)",
            "SET x",
            "EXPLAIN",
            "SELECT 1 SELECT 2",
            "CREATE SOURCE s (a BIGINT) WITH (",
        ] {
            assert!(parse_script(sql).is_err(), "{sql} should fail");
        }
    }
}

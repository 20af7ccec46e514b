#!/usr/bin/env bash
# Installs the classpath of an Apache Kafka broker (KRaft mode) for the integration tests that
# need a real Kafka, from Maven Central through Maven: no tarball download, no Docker.
#
#   bash scripts/kafka.sh      # prints the install directory as its last line
#
# The jars land in ${MARQUEE_KAFKA_HOME:-$HOME/.cache/marquee-kafka/4.4.0}/libs; tests/common/kafka.rs
# runs `java -cp '<libs>/*' kafka.Kafka` from there. Idempotent: a marker file written last
# says the folder is complete, and then the script only prints the directory.
set -euo pipefail

KAFKA_VERSION=4.4.0
# Kafka's own jars bring log4j-core 2.25.5 and slf4j-api 1.7; this binds slf4j 1.x to that
# log4j-core, so the broker logs through the log4j2 config that the tests write.
LOG4J_VERSION=2.25.5
DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

home="${MARQUEE_KAFKA_HOME:-$HOME/.cache/marquee-kafka/$KAFKA_VERSION}"
libs="$home/libs"
marker="$libs/.complete" # java's `libs/*` classpath wildcard only picks up *.jar

if [ -f "$marker" ]; then
  echo "$home"
  exit 0
fi

# The broker's classes target Java 17.
if ! command -v java >/dev/null 2>&1; then
  echo "kafka.sh: java is missing: Kafka $KAFKA_VERSION needs a Java 17+ runtime (apt-get install openjdk-17-jre-headless)" >&2
  exit 1
fi
java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
if [ "${java_major%%.*}" -lt 17 ] 2>/dev/null; then
  echo "kafka.sh: java is version $java_major; Kafka $KAFKA_VERSION needs Java 17 or newer" >&2
  exit 1
fi
if ! command -v mvn >/dev/null 2>&1; then
  echo "kafka.sh: mvn is missing: Maven installs Kafka's jars from Maven Central (apt-get install maven)" >&2
  exit 1
fi

echo "kafka.sh: installing Apache Kafka $KAFKA_VERSION's jars into $libs" >&2
mkdir -p "$home"
work=$(mktemp -d "$home/.install.XXXXXX")
trap 'rm -rf "$work"' EXIT

cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.marquee</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM

# Copy into a staging folder and move it in place whole, so an interrupted run never leaves a
# libs folder that looks usable.
mvn -B -q -f "$work/pom.xml" "$DEPENDENCY_PLUGIN:copy-dependencies" \
  -DincludeScope=runtime -DoutputDirectory="$work/libs" >&2
if [ ! -f "$work/libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then
  echo "kafka.sh: Maven finished but kafka_2.13-$KAFKA_VERSION.jar is not in $work/libs" >&2
  exit 1
fi
echo "kafka $KAFKA_VERSION" >"$work/libs/.complete"
rm -rf "$libs"
mv "$work/libs" "$libs"

echo "$home"

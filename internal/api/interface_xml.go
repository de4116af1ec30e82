// Code kept equal to docs/org.berth1.xml by TestInterfaceXMLMatchesDocs.

package api

// InterfaceXML is the D-Bus interface description of org.berth1, byte for
// byte the file docs/org.berth1.xml.
const InterfaceXML = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<!-- The org.berth1 D-Bus API (docs/dbus-api.md). berthd exports
     org.berth1.Manager at /org/berth1 and one org.berth1.Job object per job
     at /org/berth1/job/N; a test checks that the daemon exports exactly
     these interfaces. -->
<node>
  <interface name="org.berth1.Manager">
    <property name="Booted" type="s" access="read"/>
    <property name="Staged" type="s" access="read"/>
    <property name="Rollback" type="s" access="read"/>
    <property name="Deployments" type="as" access="read"/>
    <property name="ActiveJob" type="o" access="read"/>
    <property name="TrackedImage" type="s" access="read"/>
    <method name="GetStatus">
      <arg name="status" type="s" direction="out"/>
    </method>
    <method name="Upgrade">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Switch">
      <arg name="image" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Rollback">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Cleanup">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Pin">
      <arg name="deployment" type="s" direction="in"/>
      <arg name="pinned" type="b" direction="in"/>
    </method>
    <method name="Diff">
      <arg name="deployment" type="s" direction="in"/>
      <arg name="changes" type="s" direction="out"/>
    </method>
    <method name="Reset">
      <arg name="paths" type="as" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="result" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.berth1.Job">
    <property name="Kind" type="s" access="read"/>
    <property name="State" type="s" access="read"/>
    <property name="Progress" type="(stt)" access="read"/>
    <property name="Summary" type="s" access="read"/>
    <property name="Error" type="s" access="read"/>
    <method name="Cancel"/>
    <signal name="Progress">
      <arg name="phase" type="s"/>
      <arg name="done" type="t"/>
      <arg name="total" type="t"/>
    </signal>
    <signal name="Finished">
      <arg name="result" type="s"/>
      <arg name="error" type="s"/>
    </signal>
  </interface>
</node>
`

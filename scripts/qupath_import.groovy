/*
 * Import wsiseg's tumour contours into the image open in QuPath (0.4 or newer).
 *
 *   1. Open the slide in QuPath.
 *   2. Automate > Script editor > File > Open... this file.
 *   3. Set OUTPUT_DIR below to the wsiseg run folder (the one holding summary.json), or leave it empty to be asked.
 *   4. Run. The script picks <run folder>/<slide name>/tumour.geojson for the open image (the slide's file name
 *      without its extension, as wsiseg names the folder) and adds its polygons as "Tumor" annotations.
 *
 * wsiseg writes the contours with writer.contours=geojson (or [geojson,asap_xml]); coordinates are level-0 pixels
 * of the slide, which is what QuPath expects.
 */
import qupath.lib.io.PathIO
import qupath.lib.gui.dialogs.Dialogs

def OUTPUT_DIR = ""   // e.g. "/data/outputs/run1"

def imageData = getCurrentImageData()
if (imageData == null) {
    println "Open a slide first"
    return
}
def serverPath = imageData.getServer().getURIs()[0].getPath()
def slideName = new File(serverPath).getName()
for (suffix in [".ome.tiff", ".ome.tif"]) {
    if (slideName.toLowerCase().endsWith(suffix)) { slideName = slideName.substring(0, slideName.length() - suffix.length()) }
}
if (slideName.contains(".")) { slideName = slideName.substring(0, slideName.lastIndexOf(".")) }

def runDir = OUTPUT_DIR ? new File(OUTPUT_DIR) : Dialogs.promptForDirectory("wsiseg run folder", null)
if (runDir == null) { return }
def geojson = new File(new File(runDir, slideName), "tumour.geojson")
if (!geojson.isFile()) {
    println "No ${geojson}: run wsiseg-predict with writer.contours=geojson for this slide"
    return
}
def objects = PathIO.readObjects(geojson)
addObjects(objects)
println "Imported ${objects.size()} tumour region(s) from ${geojson}"
